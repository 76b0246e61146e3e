// CUDA kernel for mmkernels::moe_route: one warp per token, the token's N+Z scores in registers (lane l holds
// experts l, l+32, l+64, ...), top-k by K rounds of a warp-wide arg-max in the selection order of moe_route.h
// (NaN below -inf, ties to the lower expert id), counts by integer atomics (order-independent, so still
// deterministic). No host synchronisation. Non-finite input: the rules of mmkernels/ops/moe.py, as the CPU kernel.
// Supports N+Z <= 1024, top_k <= 32, n_groups <= 32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../moe_route.h"

namespace mmkernels {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

struct Pick {
  uint32_t key;  // choice_key of the biased score: the selection order (NaN below -inf; see moe_route.h)
  int id;        // expert id; larger than any real id when empty
  float score;   // unbiased score of that expert
};

__device__ __forceinline__ bool better(const Pick& a, const Pick& b) {
  return a.key > b.key || (a.key == b.key && a.id < b.id);
}

__device__ __forceinline__ Pick warp_best(Pick p) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Pick o;
    o.key = __shfl_xor_sync(kFull, p.key, offset);
    o.id = __shfl_xor_sync(kFull, p.id, offset);
    o.score = __shfl_xor_sync(kFull, p.score, offset);
    if (better(o, p)) p = o;
  }
  return p;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

// Max that propagates NaN, like ATen's softmax (fmaxf would drop it and hide a NaN logit).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(kFull, v, offset));
  return v;
}

// Top-2 (key, value) of a group; empty entries have key 0 (below every real key: NaN's is 1).
struct Top2 {
  uint32_t k1, k2;
  float v1, v2;
};

__device__ __forceinline__ void top2_insert(Top2& t, uint32_t k, float v) {
  if (k > t.k1) {
    t.k2 = t.k1, t.v2 = t.v1, t.k1 = k, t.v1 = v;
  } else if (k > t.k2) {
    t.k2 = k, t.v2 = v;
  }
}

template <int V, typename scalar_t>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    moe_route_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ bias, int32_t* __restrict__ ids,
                     float* __restrict__ weights, float* __restrict__ zero_weight, int32_t* __restrict__ counts,
                     RouteParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= p.tokens) return;  // whole warps exit together
  const int E = static_cast<int>(p.experts);
  const scalar_t* row = logits + t * p.experts;

  // Scores as fp32 torch.softmax / torch.sigmoid give them, NaN included: a NaN logit makes the softmax row NaN,
  // as does a +inf logit (inf - inf) or a row of -inf (-inf - -inf).
  float score[V];
  uint32_t key[V];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int e = lane + i * kWarp;
    score[i] = e < E ? static_cast<float>(row[e]) : 0.0f;
    if (e < E) m = nan_max(m, score[i]);
  }
  if (p.sigmoid) {
#pragma unroll
    for (int i = 0; i < V; ++i) score[i] = 1.0f / (1.0f + expf(-score[i]));
  } else {
    m = warp_nan_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int e = lane + i * kWarp;
      score[i] = e < E ? expf(score[i] - m) : 0.0f;
      sum += score[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < V; ++i) score[i] = score[i] / sum;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int e = lane + i * kWarp;
    key[i] = e < E ? choice_key(bias ? score[i] + bias[e] : score[i]) : kExcludedKey;
  }

  if (p.n_groups > 1) {  // DeepSeek-V3 group-limited choice, in the same selection order
    const int group = E / static_cast<int>(p.n_groups);
    uint32_t my_group_key = kExcludedKey;  // lane g keeps group g's key
    for (int g = 0; g < p.n_groups; ++g) {
      Top2 best{0u, 0u, 0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int e = lane + i * kWarp;
        if (e < E && e / group == g) top2_insert(best, key[i], bias ? score[i] + bias[e] : score[i]);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {  // merge the lanes' top-2 lists (equal keys: equal values)
        const uint32_t o1 = __shfl_xor_sync(kFull, best.k1, offset), o2 = __shfl_xor_sync(kFull, best.k2, offset);
        const float w1 = __shfl_xor_sync(kFull, best.v1, offset), w2 = __shfl_xor_sync(kFull, best.v2, offset);
        top2_insert(best, o1, w1);
        top2_insert(best, o2, w2);
      }
      if (lane == g) my_group_key = choice_key(group >= 2 ? best.v1 + best.v2 : best.v1);
    }
    unsigned keep = 0;
    Pick gp{my_group_key, lane < p.n_groups ? lane : 1 << 30, 0.0f};
    for (int r = 0; r < p.topk_groups; ++r) {
      const Pick best = warp_best(gp);
      keep |= 1u << best.id;
      if (lane == best.id) gp.key = 0u, gp.id = 1 << 30;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int e = lane + i * kWarp;
      if (e < E && !((keep >> (e / group)) & 1u)) key[i] = kExcludedKey;
    }
  }

  unsigned taken = 0;  // bit i: this lane's expert lane + 32 i is already picked
  int my_id = 0;       // lane r keeps the r-th pick
  float my_score = 0.0f, picked_sum = 0.0f;
  for (int r = 0; r < p.top_k; ++r) {
    Pick local{0u, 1 << 30, 0.0f};
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int e = lane + i * kWarp;
      const Pick cand{key[i], e, score[i]};
      if (e < E && !((taken >> i) & 1u) && (local.id == (1 << 30) || better(cand, local))) local = cand;
    }
    const Pick best = warp_best(local);
    if (best.id % kWarp == lane) taken |= 1u << (best.id / kWarp);
    if (lane == r) {
      my_id = best.id;
      my_score = best.score;
    }
    picked_sum += best.score;  // in pick order on every lane, as the CPU kernel sums
  }
  // The reference's operations: p / (sum + 1e-20) * s (never 0/0), or p * s.
  const float w = lane < p.top_k ? (p.renormalize ? my_score / (picked_sum + kRenormEps) * p.scale
                                                  : my_score * p.scale)
                                 : 0.0f;
  if (lane < p.top_k) {
    ids[t * p.top_k + lane] = my_id;
    weights[t * p.top_k + lane] = w;
    atomicAdd(counts + my_id, 1);
  }
  // Zero slots only (a select, not a product with a mask): a NaN weight on an FFN slot never leaks in.
  const float zw = warp_sum(lane < p.top_k && my_id >= p.num_ffn ? w : 0.0f);
  if (lane == 0) zero_weight[t] = zw;
}

template <int V>
void launch(const at::Tensor& logits, const float* bias, at::Tensor& ids, at::Tensor& weights,
            at::Tensor& zero_weight, at::Tensor& counts, const RouteParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_cuda", [&] {
    moe_route_kernel<V, scalar_t><<<grid, kWarp * kWarpsPerBlock, 0, stream>>>(
        logits.data_ptr<scalar_t>(), bias, ids.data_ptr<int32_t>(), weights.data_ptr<float>(),
        zero_weight.data_ptr<float>(), counts.data_ptr<int32_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& bias_in, int64_t top_k, int64_t num_ffn_experts,
    c10::string_view scoring, double routed_scaling_factor, bool renormalize, int64_t n_groups,
    int64_t topk_groups) {
  const RouteParams p = check_route_args(logits_in, bias_in, top_k, num_ffn_experts, scoring, routed_scaling_factor,
                                         renormalize, n_groups, topk_groups);
  TORCH_CHECK(p.experts <= 32 * kWarp, "moe_route (cuda): N+Z must be <= 1024");
  TORCH_CHECK(p.top_k <= kWarp, "moe_route (cuda): top_k must be <= 32");
  TORCH_CHECK(p.n_groups <= kWarp, "moe_route (cuda): n_groups must be <= 32");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  auto [ids, weights, zero_weight, counts] = alloc_route_outputs(logits, p);
  if (p.tokens == 0) return {weights, zero_weight, ids, counts};
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t v = (p.experts + kWarp - 1) / kWarp;
  if (v <= 4) launch<4>(logits, bp, ids, weights, zero_weight, counts, p, stream);
  else if (v <= 8) launch<8>(logits, bp, ids, weights, zero_weight, counts, p, stream);
  else if (v <= 16) launch<16>(logits, bp, ids, weights, zero_weight, counts, p, stream);
  else launch<32>(logits, bp, ids, weights, zero_weight, counts, p, stream);
  return {weights, zero_weight, ids, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) { m.impl("moe_route", &moe_route_cuda); }

}  // namespace mmkernels
