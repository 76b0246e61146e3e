// C++ CPU kernel for mmkernels::moe_route: scores, biased top-k (lower id wins ties, NaN ranks last), weights,
// zero_weight, counts. Schema and the rules for non-finite input: mmkernels/ops/moe.py.
//
// Scores come from ATen's own softmax / sigmoid kernels (vectorised, parallel), so they are the reference's bits
// and the choice (score + bias, one fp32 add) is too: ids agree exactly with the reference on any input. One
// parallel pass over tokens then does the selection, the weights, zero_weight and per-thread count histograms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "../moe_route.h"

namespace mmkernels {
namespace {

constexpr int64_t kBlock = 16;        // experts per block of the two-stage selection
constexpr int64_t kMaxK = 64;         // top_k above this: a stable sort of all experts instead
constexpr int64_t kMaxCounted = 128;  // more blocks than this: their k-th best key by nth_element, not counting
constexpr int64_t kMaxRanked = 96;    // more competitors than this (ties en masse): the insertion pass, not ranks
constexpr int64_t kScoreBlockFloats = 32768;  // softmax scores computed a block of rows (128 KiB) at a time

// Runs f(begin, end) over chunks of [0, n) on ATen's intra-op threads. at::parallel_for is header-only and runs
// serially unless this file is compiled with OpenMP (setup.py passes no -fopenmp); TensorIterator::for_each is
// compiled into libtorch and calls ATen's parallel_for there, so it uses torch's thread pool whatever our flags.
template <typename F>
void parallel_over(int64_t n, int64_t grain, const F& f) {
#ifdef INTRA_OP_PARALLEL
  at::parallel_for(0, n, grain, f);
#else
  const at::Tensor domain = at::empty({n}, at::TensorOptions(at::kByte));  // element i stands for index i
  at::TensorIterator iter =
      at::TensorIteratorConfig().add_output(domain).resize_outputs(false).check_all_same_dtype(false).build();
  const char* base = static_cast<const char*>(domain.const_data_ptr());
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        for (int64_t j = 0; j < size1; ++j) {
          const int64_t begin = data[0] + j * strides[1] - base;
          f(begin, begin + size0);
        }
      },
      grain);
#endif
}

// The vectorisable loops below are compiled for AVX-512F, AVX2 and baseline x86-64 (the build passes no -march);
// the loader picks the best the CPU has (GCC function multiversioning; other compilers get the baseline only).
#if defined(__GNUC__) && __GNUC__ >= 6 && defined(__x86_64__) && !defined(__clang__)
#define MMK_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MMK_VECTOR_CLONES
#endif

MMK_VECTOR_CLONES void choice_keys(const float* s, const float* bias, int64_t n, uint32_t* key) {
  if (bias) {
    for (int64_t e = 0; e < n; ++e) key[e] = choice_key(s[e] + bias[e]);  // the reference's fp32 add
  } else {
    for (int64_t e = 0; e < n; ++e) key[e] = choice_key(s[e]);
  }
}

MMK_VECTOR_CLONES void block_maxima(const uint32_t* key, int64_t n, uint32_t* block_best) {
  for (int64_t lo = 0, b = 0; lo < n; lo += kBlock, ++b) {
    const int64_t hi = std::min(lo + kBlock, n);
    uint32_t m = 0;
    for (int64_t e = lo; e < hi; ++e) m = std::max(m, key[e]);
    block_best[b] = m;
  }
}

// Bit j of mask[b]: expert b * kBlock + j has a key >= thr (one compare of 16 keys per block with AVX-512).
MMK_VECTOR_CLONES void masks_at_least(const uint32_t* key, int64_t n, uint32_t thr, uint32_t* mask) {
  int64_t b = 0;
  for (; (b + 1) * kBlock <= n; ++b) {
    uint32_t m = 0;
    for (int64_t j = 0; j < kBlock; ++j) m |= static_cast<uint32_t>(key[b * kBlock + j] >= thr) << j;
    mask[b] = m;
  }
  if (b * kBlock < n) {
    uint32_t m = 0;
    for (int64_t j = 0; b * kBlock + j < n; ++j) m |= static_cast<uint32_t>(key[b * kBlock + j] >= thr) << j;
    mask[b] = m;
  }
}

// The k-th largest of v[0..n) (with multiplicity), k <= n: the largest v[i] that at least k values reach.
MMK_VECTOR_CLONES uint32_t kth_largest(const uint32_t* v, int64_t n, int64_t k) {
  uint32_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    int32_t reach = 0;  // 32-bit lanes: twice as many per vector as int64_t
    for (int64_t j = 0; j < n; ++j) reach += v[j] >= v[i];
    if (reach >= k) best = std::max(best, v[i]);
  }
  return best;
}

// Rank of each candidate in the selection order (key descending, then position, i.e. id, ascending); those of
// rank < k go to ids[rank]. Candidates are in increasing id order.
MMK_VECTOR_CLONES void rank_into(const uint32_t* key, const int32_t* id, int64_t n, int64_t k, int32_t* ids) {
  for (int64_t i = 0; i < n; ++i) {
    int32_t rank = 0;
    for (int64_t j = 0; j < i; ++j) rank += key[j] >= key[i];
    for (int64_t j = i + 1; j < n; ++j) rank += key[j] > key[i];
    if (rank < k) ids[rank] = id[i];
  }
}

// Keeps the k best (key, id) of a stream visited in increasing id order, best first. A newcomer enters only if
// its key is strictly larger than the current k-th (ties keep the earlier, lower id).
struct TopK {
  int64_t k, kept = 0;
  uint32_t key[kMaxK];
  int32_t id[kMaxK];

  explicit TopK(int64_t k_) : k(k_) {}
  void offer(uint32_t v, int32_t i) {
    if (kept == k && v <= key[k - 1]) return;
    int64_t pos = kept < k ? kept++ : k - 1;
    for (; pos > 0 && v > key[pos - 1]; --pos) {
      key[pos] = key[pos - 1];
      id[pos] = id[pos - 1];
    }
    key[pos] = v;
    id[pos] = i;
  }
};

// Per-token scratch of the selection.
struct Scratch {
  std::vector<uint32_t> key, block_best, mask, cand_key, group_key;
  std::vector<int32_t> cand;
  std::vector<char> keep;
  Scratch(int64_t experts, int64_t groups)
      : key(experts),
        block_best((experts + kBlock - 1) / kBlock),
        mask(block_best.size()),
        cand_key(experts),
        group_key(groups),
        cand(experts),
        keep(groups) {}
};


// The k best experts of one token by key (ties: lower id), best first, into ids. thr, the k-th best of the
// blocks' best keys, bounds the k-th best expert from below (k blocks each hold an expert >= thr), and every
// expert below thr is beaten by k others; so only experts >= thr compete, usually little more than k of them.
void select_topk(Scratch& w, int64_t experts, int64_t k, int32_t* ids) {
  const uint32_t* key = w.key.data();
  const int64_t blocks = (experts + kBlock - 1) / kBlock;
  block_maxima(key, experts, w.block_best.data());
  uint32_t thr = 0;
  if (k < blocks && blocks <= kMaxCounted) {
    thr = kth_largest(w.block_best.data(), blocks, k);
  } else if (k < blocks) {  // many blocks: a selection on a copy instead of the quadratic count
    std::copy(w.block_best.begin(), w.block_best.begin() + blocks, w.cand_key.begin());
    std::nth_element(w.cand_key.begin(), w.cand_key.begin() + (k - 1), w.cand_key.begin() + blocks,
                     std::greater<uint32_t>());
    thr = w.cand_key[k - 1];
  }
  masks_at_least(key, experts, thr, w.mask.data());
  int64_t n = 0;  // the competitors, in increasing id order (the tie rule needs it)
  for (int64_t b = 0; b < blocks; ++b) {
    for (uint32_t m = w.mask[b]; m != 0; m &= m - 1) {
      const int64_t e = b * kBlock + __builtin_ctz(m);
      w.cand[n] = static_cast<int32_t>(e);
      w.cand_key[n++] = key[e];
    }
  }
  if (n <= kMaxRanked) {
    rank_into(w.cand_key.data(), w.cand.data(), n, k, ids);
  } else {
    TopK best(k);
    for (int64_t i = 0; i < n; ++i) best.offer(w.cand_key[i], w.cand[i]);
    std::copy(best.id, best.id + k, ids);
  }
}

// The two best keys of key[0..n), n >= 1 (equal keys count twice); vectorised: max, count of the max, max below.
MMK_VECTOR_CLONES void top2_keys(const uint32_t* key, int64_t n, uint32_t* k1, uint32_t* k2) {
  uint32_t m1 = 0, m2 = 0;
  int32_t at_max = 0;
  for (int64_t e = 0; e < n; ++e) m1 = std::max(m1, key[e]);
  for (int64_t e = 0; e < n; ++e) at_max += key[e] == m1;
  for (int64_t e = 0; e < n; ++e) m2 = std::max(m2, key[e] & (0u - static_cast<uint32_t>(key[e] < m1)));
  *k1 = m1;
  *k2 = at_max >= 2 ? m1 : m2;
}

// The float a choice key came from (NaN for kNanKey, +0 for either zero): choice_key inverted.
inline float key_value(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Experts of the groups left out by DeepSeek-V3's group-limited choice get kExcludedKey. A group's value is the
// sum of its two best choice values in the selection order (one when a group has one expert); groups are ranked
// by choice_key of that sum, ties to the lower group. Equal keys are equal values (up to the sign of a zero, which
// no sum's key sees), so the values come back from the keys.
void exclude_groups(Scratch& w, const RouteParams& p) {
  uint32_t* key = w.key.data();
  const int64_t size = p.experts / p.n_groups;
  for (int64_t g = 0; g < p.n_groups; ++g) {
    uint32_t k1, k2;
    top2_keys(key + g * size, size, &k1, &k2);
    w.group_key[g] = choice_key(size >= 2 ? key_value(k1) + key_value(k2) : key_value(k1));
  }
  std::fill(w.keep.begin(), w.keep.end(), 0);
  for (int64_t r = 0; r < p.topk_groups; ++r) {  // topk_groups arg-max passes over n_groups values
    int64_t best = -1;
    for (int64_t g = 0; g < p.n_groups; ++g)
      if (!w.keep[g] && (best < 0 || w.group_key[g] > w.group_key[best])) best = g;
    w.keep[best] = 1;
  }
  for (int64_t g = 0; g < p.n_groups; ++g)
    if (!w.keep[g]) std::fill(key + g * size, key + (g + 1) * size, kExcludedKey);
}

// One token: scores s [E] -> ids, weights, zero_weight, counts (into this thread's histogram).
void route_token(const float* s, const float* bias, int64_t t, int32_t* ids, float* weights, float* zero_weight,
                 int32_t* hist, const RouteParams& p, Scratch& w) {
  const int64_t e_count = p.experts, k = p.top_k;
  choice_keys(s, bias, e_count, w.key.data());
  if (p.n_groups > 1) exclude_groups(w, p);
  int32_t* row_ids = ids + t * k;
  if (k <= kMaxK) {
    select_topk(w, e_count, k, row_ids);
  } else {  // large k: a stable sort of all experts by key, descending
    std::iota(w.cand.begin(), w.cand.end(), 0);
    std::stable_sort(w.cand.begin(), w.cand.end(), [&](int32_t a, int32_t b) { return w.key[a] > w.key[b]; });
    std::copy(w.cand.begin(), w.cand.begin() + k, row_ids);
  }
  // Same operations, in the same order, as the reference: w = p / (sum + eps) * s, or p * s.
  float* wt = weights + t * k;
  float total = 0.0f;
  for (int64_t i = 0; i < k; ++i) total += (wt[i] = s[row_ids[i]]);
  const float denom = total + kRenormEps;
  float zw = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    wt[i] = p.renormalize ? wt[i] / denom * p.scale : wt[i] * p.scale;
    if (row_ids[i] >= p.num_ffn) zw += wt[i];  // zero slots only: a NaN on an FFN slot never leaks in
    ++hist[row_ids[i]];
  }
  zero_weight[t] = zw;
}

// Tokens [begin, end): the scores of a block of rows, then the selection, weights and counts of each row while
// those scores are in cache. Softmax scores come from ATen's own kernel on the block (the lastdim softmax works row
// by row, so the blocking leaves the reference's bits unchanged; nested in the parallel pass, it runs serially).
// Sigmoid scores come precomputed for the whole tensor: ATen's elementwise loop computes the tail of each range it
// is given with the scalar formula, so blocking could move a 1-ulp difference onto other elements.
void route_tokens(const at::Tensor& x, const float* sigmoid_scores, const float* bias, int32_t* ids, float* weights,
                  float* zero_weight, int32_t* hist, const RouteParams& p, int64_t begin, int64_t end) {
  const int64_t e_count = p.experts;
  Scratch w(e_count, p.n_groups);
  const int64_t rows = std::max<int64_t>(1, std::min(kScoreBlockFloats / e_count, end - begin));
  at::Tensor block = sigmoid_scores ? at::Tensor() : at::empty({rows, e_count}, x.options());
  for (int64_t t0 = begin; t0 < end; t0 += rows) {
    const int64_t r = std::min(rows, end - t0);
    const float* block_scores = sigmoid_scores ? sigmoid_scores + t0 * e_count : nullptr;
    if (!sigmoid_scores) {
      at::Tensor out = block.narrow(0, 0, r);
      at::_softmax_out(out, x.narrow(0, t0, r), 1, false);
      block_scores = out.const_data_ptr<float>();
    }
    for (int64_t t = t0; t < t0 + r; ++t) route_token(block_scores + (t - t0) * e_count, bias, t, ids, weights,
                                                      zero_weight, hist, p, w);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& bias_in, int64_t top_k, int64_t num_ffn_experts,
    c10::string_view scoring, double routed_scaling_factor, bool renormalize, int64_t n_groups,
    int64_t topk_groups) {
  const RouteParams p = check_route_args(logits_in, bias_in, top_k, num_ffn_experts, scoring, routed_scaling_factor,
                                         renormalize, n_groups, topk_groups);
  auto [ids, weights, zero_weight, counts] = alloc_route_outputs(logits_in, p);
  if (p.tokens == 0) return {weights, zero_weight, ids, counts};
  // Exactly the reference's scores: logits.float(), then torch.softmax / torch.sigmoid. x is a plain view of the
  // fp32 logits without autograd metadata: the worker threads call ATen on it without this thread's dispatch state.
  const at::Tensor x32 = logits_in.to(at::kFloat).contiguous();
  const at::Tensor x = at::from_blob(const_cast<float*>(x32.const_data_ptr<float>()), {p.tokens, p.experts},
                                     x32.options());
  const at::Tensor sigmoid_scores = p.sigmoid ? at::sigmoid(x) : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const float* sp = p.sigmoid ? sigmoid_scores.const_data_ptr<float>() : nullptr;
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  int32_t* ip = ids.data_ptr<int32_t>();
  float* wp = weights.data_ptr<float>();
  float* zp = zero_weight.data_ptr<float>();
  // One count histogram per thread, summed at the end: no atomics, deterministic.
  const int64_t threads = at::get_num_threads();
  std::vector<int32_t> hist(threads * p.experts, 0);
  const int64_t grain = std::max<int64_t>(1, 16384 / p.experts);  // about 16k experts' work per chunk
  parallel_over(p.tokens, grain, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < threads, "moe_route: unexpected thread id");
    route_tokens(x, sp, bp, ip, wp, zp, hist.data() + tid * p.experts, p, begin, end);
  });
  int32_t* cp = counts.data_ptr<int32_t>();
  for (int64_t i = 0; i < threads; ++i)
    for (int64_t e = 0; e < p.experts; ++e) cp[e] += hist[i * p.experts + e];
  return {weights, zero_weight, ids, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("moe_route", &moe_route_cpu); }

}  // namespace mmkernels
