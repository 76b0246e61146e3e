// The expert-bias update rule of specs/longcat_moe.md in float32, each operation rounded on its own, in the order
// the CPU kernel (csrc/cpu/expert_bias.cpp), the Triton kernel (the CUDA backend) and the PyTorch reference share.
// The helpers stay host/device-callable (the _rn intrinsics under nvcc), so a CUDA C++ kernel could include them
// again; the one that did (csrc/cuda/expert_bias.cu) was removed for the Triton kernel, docs/ops/expert_bias.md.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MMK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMK_HOST_DEVICE inline
#endif

namespace mmkernels {

// Float32 arithmetic rounded after every operation, as the CPU compiler (ISO C++: no contraction), the PyTorch
// reference and the Triton kernel compute it. nvcc contracts `a * b + c` into one FMA by default (one rounding
// instead of two), which would make the CUDA kernel differ from the others in the last bit; the _rn intrinsics are
// never contracted.
MMK_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MMK_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MMK_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

MMK_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

enum class BiasMode : int { kPid = 0, kSign = 1 };

struct BiasUpdateParams {
  int64_t num_ffn;        // N: FFN experts; entries >= N (zero experts) are never written
  float target_share;     // K_e / (K * N): the share of all selections each FFN expert should get
  float kp, ki, kd;       // velocity-form PID gains (ki is gamma in sign mode)
  BiasMode mode;
  bool clamp;             // anti-windup: |b_i| <= max_abs
  float max_abs;
};

// Velocity-form PID step for FFN expert i. `total` is the number of selections in the batch (T_all * K);
// a batch with no selections is no observation: bias and state stay as they are.
// state0/state1 hold e_{t-1} and e_{t-2} and are advanced in place.
MMK_HOST_DEVICE float pid_step(float bias, int64_t count, int64_t total, float& state0, float& state1,
                               const BiasUpdateParams& p) {
  if (total <= 0) return bias;
  const float e = sub_rn(p.target_share, div_rn(static_cast<float>(count), static_cast<float>(total)));
  const float e1 = state0;
  const float e2 = state1;
  // ki * e + kp * (e - e1) + kd * (e - 2 e1 + e2), left to right, each product and sum rounded on its own
  const float d2 = add_rn(sub_rn(e, mul_rn(2.0f, e1)), e2);
  const float delta = add_rn(add_rn(mul_rn(p.ki, e), mul_rn(p.kp, sub_rn(e, e1))), mul_rn(p.kd, d2));
  state1 = e1;
  state0 = e;
  float b = add_rn(bias, delta);
  if (p.clamp) b = b < -p.max_abs ? -p.max_abs : (b > p.max_abs ? p.max_abs : b);
  return b;
}

// DeepSeek-V3 sign rule: b_i += gamma * sign(mean_j T_j - T_i) over FFN experts. Compared in integers
// (sum_ffn vs N * T_i) so ties are exact and the step is exactly +gamma, -gamma or 0. As in pid_step, a batch
// with no selections changes nothing; otherwise the clamp applies to every FFN bias.
MMK_HOST_DEVICE float sign_step(float bias, int64_t count, int64_t sum_ffn, int64_t total,
                                const BiasUpdateParams& p) {
  if (total <= 0) return bias;
  const int64_t diff = sum_ffn - p.num_ffn * count;
  float b = bias;
  if (diff > 0) b = add_rn(bias, p.ki);
  else if (diff < 0) b = sub_rn(bias, p.ki);
  if (p.clamp) b = b < -p.max_abs ? -p.max_abs : (b > p.max_abs ? p.max_abs : b);
  return b;
}

}  // namespace mmkernels
