// C++ CPU kernel for mmkernels::expert_bias_update_. Schema: mmkernels/ops/expert_bias.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../expert_bias.h"
#include "../checks.h"

namespace mmkernels {
namespace {

template <typename count_t>
void update_cpu(float* bias, const count_t* counts, float* state, int64_t n_total, const BiasUpdateParams& p) {
  int64_t total = 0, sum_ffn = 0;
  count_t low = 0;
  for (int64_t i = 0; i < n_total; ++i) {
    total += counts[i];
    low = counts[i] < low ? counts[i] : low;
    if (i < p.num_ffn) sum_ffn += counts[i];
  }
  // Checked here, before anything is written: on CPU the kernel reads the counts anyway (no extra pass).
  TORCH_CHECK(low >= 0, "expert_bias_update_: counts must be >= 0 (selections per expert), got a minimum of ",
              static_cast<int64_t>(low));
  float* e1 = state;
  float* e2 = state + p.num_ffn;
  for (int64_t i = 0; i < p.num_ffn; ++i) {
    bias[i] = p.mode == BiasMode::kSign ? sign_step(bias[i], counts[i], sum_ffn, total, p)
                                        : pid_step(bias[i], counts[i], total, e1[i], e2[i], p);
  }
}

void expert_bias_update_cpu(const at::Tensor& bias, const at::Tensor& counts, const at::Tensor& state,
                            int64_t num_ffn_experts, int64_t top_k, double target_ffn_per_token, double kp, double ki,
                            double kd, c10::string_view mode, std::optional<double> max_abs) {
  const BiasUpdateParams p =
      make_bias_params(bias, counts, state, num_ffn_experts, top_k, target_ffn_per_token, kp, ki, kd, mode, max_abs);
  AT_DISPATCH_INDEX_TYPES(counts.scalar_type(), "expert_bias_update_cpu", [&] {
    update_cpu<index_t>(bias.data_ptr<float>(), counts.data_ptr<index_t>(), state.data_ptr<float>(), bias.numel(), p);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("expert_bias_update_", &expert_bias_update_cpu); }

}  // namespace mmkernels
