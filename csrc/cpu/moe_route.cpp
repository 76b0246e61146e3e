// C++ CPU kernel for mmkernels::moe_route: scores, biased top-k (lower id wins ties), weights, zero_weight, counts.
// Schema: mmkernels/ops/moe.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../moe_route.h"

namespace mmkernels {
namespace {

// Descending by value, ascending by id among equal values: the deterministic order of the contract.
struct ByChoice {
  const float* v;
  bool operator()(int64_t a, int64_t b) const { return v[a] > v[b] || (v[a] == v[b] && a < b); }
};

template <typename scalar_t>
void route_rows(const scalar_t* logits, const float* bias, int32_t* ids, float* weights, float* zero_weight,
                const RouteParams& p, int64_t begin, int64_t end) {
  const int64_t e_count = p.experts;
  const int64_t group = e_count / p.n_groups;
  std::vector<float> score(e_count), choice(e_count);
  std::vector<int64_t> order(e_count), gorder(p.n_groups);
  std::vector<float> gscore(p.n_groups);
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* row = logits + t * e_count;
    if (p.sigmoid) {
      for (int64_t e = 0; e < e_count; ++e) score[e] = 1.0f / (1.0f + std::exp(-static_cast<float>(row[e])));
    } else {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < e_count; ++e) m = std::max(m, static_cast<float>(row[e]));
      float sum = 0.0f;
      for (int64_t e = 0; e < e_count; ++e) sum += (score[e] = std::exp(static_cast<float>(row[e]) - m));
      const float inv = 1.0f / sum;
      for (int64_t e = 0; e < e_count; ++e) score[e] *= inv;
    }
    for (int64_t e = 0; e < e_count; ++e) choice[e] = bias ? score[e] + bias[e] : score[e];
    if (p.n_groups > 1) {
      for (int64_t g = 0; g < p.n_groups; ++g) {
        float b1 = -std::numeric_limits<float>::infinity(), b2 = b1;
        for (int64_t e = g * group; e < (g + 1) * group; ++e) {
          if (choice[e] > b1) { b2 = b1; b1 = choice[e]; } else if (choice[e] > b2) { b2 = choice[e]; }
        }
        gscore[g] = group >= 2 ? b1 + b2 : b1;
      }
      std::iota(gorder.begin(), gorder.end(), 0);
      std::partial_sort(gorder.begin(), gorder.begin() + p.topk_groups, gorder.end(), ByChoice{gscore.data()});
      std::vector<char> keep(p.n_groups, 0);
      for (int64_t i = 0; i < p.topk_groups; ++i) keep[gorder[i]] = 1;
      for (int64_t e = 0; e < e_count; ++e)
        if (!keep[e / group]) choice[e] = -std::numeric_limits<float>::infinity();
    }
    // Keep the k best in order with an insertion step; most experts fail the first comparison (O(E) typically).
    const ByChoice before{choice.data()};
    int64_t kept = 0;
    for (int64_t e = 0; e < e_count; ++e) {
      if (kept == p.top_k && !before(e, order[kept - 1])) continue;
      int64_t pos = kept < p.top_k ? kept++ : kept - 1;
      while (pos > 0 && before(e, order[pos - 1])) {
        order[pos] = order[pos - 1];
        --pos;
      }
      order[pos] = e;
    }
    float total = 0.0f;
    for (int64_t k = 0; k < p.top_k; ++k) total += score[order[k]];
    const float factor = p.renormalize ? p.scale / total : p.scale;
    float zw = 0.0f;
    for (int64_t k = 0; k < p.top_k; ++k) {
      const int64_t e = order[k];
      const float w = score[e] * factor;
      ids[t * p.top_k + k] = static_cast<int32_t>(e);
      weights[t * p.top_k + k] = w;
      if (e >= p.num_ffn) zw += w;
    }
    zero_weight[t] = zw;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& bias_in, int64_t top_k, int64_t num_ffn_experts,
    c10::string_view scoring, double routed_scaling_factor, bool renormalize, int64_t n_groups,
    int64_t topk_groups) {
  const RouteParams p = check_route_args(logits_in, bias_in, top_k, num_ffn_experts, scoring, routed_scaling_factor,
                                         renormalize, n_groups, topk_groups);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  auto [ids, weights, zero_weight, counts] = alloc_route_outputs(logits, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    int32_t* ip = ids.data_ptr<int32_t>();
    float* wp = weights.data_ptr<float>();
    float* zp = zero_weight.data_ptr<float>();
    at::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) {
      route_rows<scalar_t>(lp, bp, ip, wp, zp, p, begin, end);
    });
  });
  // The histogram after the parallel part keeps it deterministic and free of atomics.
  int32_t* cp = counts.data_ptr<int32_t>();
  const int32_t* ip = ids.data_ptr<int32_t>();
  for (int64_t i = 0; i < p.tokens * p.top_k; ++i) ++cp[ip[i]];
  return {weights, zero_weight, ids, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("moe_route", &moe_route_cpu); }

}  // namespace mmkernels
