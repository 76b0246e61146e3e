// The Python module mmkernels._C. Importing it registers the C++ (CPU) and CUDA implementations of the
// mmkernels::* ops with the dispatcher (TORCH_LIBRARY_IMPL blocks in csrc/cpu and csrc/cuda).
// The schemas themselves are declared once, in Python (mmkernels/ops/<family>.py), so the ops exist with their
// Triton and PyTorch backends even when this extension is not built.
#include <torch/extension.h>

#include <string>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

namespace {

bool has_cuda_kernels() {
#ifdef MMKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string built_with_torch() {
#ifdef TORCH_VERSION_MAJOR
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels compiled kernels (C++ CPU and, when built, CUDA)";
  m.def("has_cuda_kernels", &has_cuda_kernels, "True when the CUDA sources were compiled into this extension");
  m.def("built_with_torch", &built_with_torch, "torch version (major.minor.patch) the extension was compiled with");
}
