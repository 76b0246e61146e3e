// Argument checks shared by the C++ CPU and CUDA implementations. The public Python functions validate
// first and give friendlier messages; these guard direct torch.ops.mmkernels.* calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "expert_bias.h"  // BiasUpdateParams

namespace mmkernels {

inline BiasUpdateParams make_bias_params(const at::Tensor& bias, const at::Tensor& counts, const at::Tensor& state,
                                         int64_t num_ffn_experts, int64_t top_k, double target_ffn_per_token,
                                         double kp, double ki, double kd, c10::string_view mode,
                                         std::optional<double> max_abs) {
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.is_contiguous(),
              "expert_bias_update_: bias must be a contiguous float32 vector [N+Z]");
  TORCH_CHECK(counts.dim() == 1 && counts.numel() == bias.numel() && counts.is_contiguous(),
              "expert_bias_update_: counts must be a contiguous vector of the same length as bias");
  TORCH_CHECK(counts.scalar_type() == at::kInt || counts.scalar_type() == at::kLong,
              "expert_bias_update_: counts must be int32 or int64");
  TORCH_CHECK(num_ffn_experts >= 1 && num_ffn_experts <= bias.numel(),
              "expert_bias_update_: num_ffn_experts must be in [1, len(bias)]");
  TORCH_CHECK(state.dim() == 2 && state.size(0) == 2 && state.size(1) == num_ffn_experts &&
                  state.scalar_type() == at::kFloat && state.is_contiguous(),
              "expert_bias_update_: state must be a contiguous float32 tensor [2, num_ffn_experts]");
  TORCH_CHECK(top_k >= 1, "expert_bias_update_: top_k must be >= 1");
  TORCH_CHECK(bias.device() == counts.device() && bias.device() == state.device(),
              "expert_bias_update_: bias, counts and state must be on one device");
  const std::string_view m(mode.data(), mode.size());
  TORCH_CHECK(m == "pid" || m == "sign", "expert_bias_update_: mode must be 'pid' or 'sign'");
  TORCH_CHECK(!max_abs.has_value() || *max_abs >= 0.0, "expert_bias_update_: max_abs must be >= 0");
  BiasUpdateParams p;
  p.num_ffn = num_ffn_experts;
  p.target_share = static_cast<float>(target_ffn_per_token / (static_cast<double>(top_k) * num_ffn_experts));
  p.kp = static_cast<float>(kp);
  p.ki = static_cast<float>(ki);
  p.kd = static_cast<float>(kd);
  p.mode = m == "sign" ? BiasMode::kSign : BiasMode::kPid;
  p.clamp = max_abs.has_value();
  p.max_abs = max_abs.has_value() ? static_cast<float>(*max_abs) : 0.0f;
  return p;
}

}  // namespace mmkernels
