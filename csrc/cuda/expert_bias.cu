// CUDA kernel for mmkernels::expert_bias_update_: one block reads the counts, reduces the totals and updates
// every FFN bias in place. No host synchronisation, no allocation: safe inside CUDA-graph capture.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../expert_bias.h"

namespace mmkernels {
namespace {

constexpr int kThreads = 1024;

template <typename count_t>
__global__ void __launch_bounds__(kThreads) expert_bias_update_kernel(float* __restrict__ bias,
                                                                      const count_t* __restrict__ counts,
                                                                      float* __restrict__ state, int64_t n_total,
                                                                      BiasUpdateParams p) {
  __shared__ long long s_total[kThreads / 32];
  __shared__ long long s_ffn[kThreads / 32];
  long long total = 0, sum_ffn = 0;
  for (int64_t i = threadIdx.x; i < n_total; i += blockDim.x) {
    const long long c = static_cast<long long>(counts[i]);
    total += c;
    if (i < p.num_ffn) sum_ffn += c;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    total += __shfl_down_sync(0xffffffffu, total, offset);
    sum_ffn += __shfl_down_sync(0xffffffffu, sum_ffn, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_total[warp] = total;
    s_ffn[warp] = sum_ffn;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x / 32;
    total = lane < n_warps ? s_total[lane] : 0;
    sum_ffn = lane < n_warps ? s_ffn[lane] : 0;
    for (int offset = 16; offset > 0; offset >>= 1) {
      total += __shfl_down_sync(0xffffffffu, total, offset);
      sum_ffn += __shfl_down_sync(0xffffffffu, sum_ffn, offset);
    }
    if (lane == 0) {
      s_total[0] = total;
      s_ffn[0] = sum_ffn;
    }
  }
  __syncthreads();
  total = s_total[0];
  sum_ffn = s_ffn[0];

  float* e1 = state;
  float* e2 = state + p.num_ffn;
  for (int64_t i = threadIdx.x; i < p.num_ffn; i += blockDim.x) {
    const int64_t c = static_cast<int64_t>(counts[i]);
    if (p.mode == BiasMode::kSign) {
      bias[i] = sign_step(bias[i], c, sum_ffn, total, p);
    } else {
      float s0 = e1[i], s1 = e2[i];
      bias[i] = pid_step(bias[i], c, total, s0, s1, p);
      e1[i] = s0;
      e2[i] = s1;
    }
  }
}

void expert_bias_update_cuda(const at::Tensor& bias, const at::Tensor& counts, const at::Tensor& state,
                             int64_t num_ffn_experts, int64_t top_k, double target_ffn_per_token, double kp, double ki,
                             double kd, c10::string_view mode, std::optional<double> max_abs) {
  const BiasUpdateParams p =
      make_bias_params(bias, counts, state, num_ffn_experts, top_k, target_ffn_per_token, kp, ki, kd, mode, max_abs);
  const c10::cuda::CUDAGuard guard(bias.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(counts.scalar_type(), "expert_bias_update_cuda", [&] {
    expert_bias_update_kernel<index_t><<<1, kThreads, 0, stream>>>(
        bias.data_ptr<float>(), counts.data_ptr<index_t>(), state.data_ptr<float>(), bias.numel(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) { m.impl("expert_bias_update_", &expert_bias_update_cuda); }

}  // namespace mmkernels
