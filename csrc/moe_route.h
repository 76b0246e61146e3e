// Shared by the CPU and CUDA routing kernels: argument checks and the launch parameters.
// Semantics: ../shared/specs/longcat_moe.md and mmkernels/kernels/reference/moe.py (the oracle).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>

namespace mmkernels {

struct RouteParams {
  int64_t tokens;
  int64_t experts;       // N + Z
  int64_t num_ffn;       // N: ids >= N are zero-computation experts
  int64_t top_k;
  bool sigmoid;          // scoring: sigmoid instead of softmax
  float scale;           // routed_scaling_factor
  bool renormalize;
  int64_t n_groups;      // 1: no group-limited choice
  int64_t topk_groups;
};

inline RouteParams check_route_args(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
                                    int64_t num_ffn_experts, c10::string_view scoring, double scale,
                                    bool renormalize, int64_t n_groups, int64_t topk_groups) {
  TORCH_CHECK(logits.dim() == 2, "moe_route: logits must be [T, N+Z]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              "moe_route: logits must be float32, float16 or bfloat16");
  const int64_t experts = logits.size(1);
  TORCH_CHECK(experts >= 1, "moe_route: need at least one expert");
  TORCH_CHECK(top_k >= 1 && top_k <= experts, "moe_route: top_k must be in [1, N+Z]");
  TORCH_CHECK(num_ffn_experts >= 0 && num_ffn_experts <= experts, "moe_route: num_ffn_experts must be in [0, N+Z]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == experts && bias->scalar_type() == at::kFloat,
                "moe_route: bias must be float32 [N+Z]");
    TORCH_CHECK(bias->device() == logits.device(), "moe_route: bias must be on the logits' device");
  }
  const std::string_view s(scoring.data(), scoring.size());
  TORCH_CHECK(s == "softmax" || s == "sigmoid", "moe_route: scoring must be 'softmax' or 'sigmoid'");
  TORCH_CHECK(n_groups >= 1 && experts % n_groups == 0, "moe_route: n_groups must divide N+Z");
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= n_groups, "moe_route: topk_groups must be in [1, n_groups]");
  TORCH_CHECK(n_groups == 1 || top_k <= topk_groups * (experts / n_groups),
              "moe_route: top_k exceeds the experts left in the kept groups");
  return RouteParams{logits.size(0), experts, num_ffn_experts, top_k, s == "sigmoid", static_cast<float>(scale),
                     renormalize, n_groups, topk_groups};
}

#if defined(__CUDACC__)
#define MMK_HOST_DEVICE __host__ __device__
#else
#define MMK_HOST_DEVICE
#endif

// HF DeepSeek-V3's renormalisation epsilon: w = p / (sum + 1e-20), never 0/0. Same as RENORM_EPS in Python.
constexpr float kRenormEps = 1e-20f;

// The selection order of every backend as one unsigned key, larger = better: numbers by value (-0 == +0, -inf
// lowest), then NaN, then experts excluded by the group-limited choice (kExcludedKey). Equal keys go to the
// lower expert id. Numbers map monotonically: flip all bits of negatives, set the sign bit of positives.
constexpr uint32_t kExcludedKey = 0u;
constexpr uint32_t kNanKey = 1u;  // below -inf, whose key is 0x007fffff

MMK_HOST_DEVICE inline uint32_t choice_key(float v) {
#if defined(__CUDA_ARCH__)
  const uint32_t b = __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
#endif
  const uint32_t number = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  // Selects, not early returns: the CPU loop over experts vectorises. -0 ties with +0, as comparisons say.
  return v != v ? kNanKey : (v == 0.0f ? 0x80000000u : number);
}

// (ids, weights, zero_weight, counts); the op returns them as (weights, zero_weight, ids, counts).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> alloc_route_outputs(const at::Tensor& logits,
                                                                                     const RouteParams& p) {
  auto opts = logits.options();
  return {at::empty({p.tokens, p.top_k}, opts.dtype(at::kInt)), at::empty({p.tokens, p.top_k}, opts.dtype(at::kFloat)),
          at::empty({p.tokens}, opts.dtype(at::kFloat)), at::zeros({p.experts}, opts.dtype(at::kInt))};
}

}  // namespace mmkernels
