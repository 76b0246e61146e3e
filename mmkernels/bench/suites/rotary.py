"""``rotary_embedding``: the vision towers' rotate-half RoPE on q and k in one launch, against HF's
``apply_rotary_pos_emb_vision`` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL).

Baselines:
- ``HF apply_rotary_pos_emb_vision`` when transformers is installed (float32 copies of q, k, cos and sin, then
  elementwise ops, per layer), else ``eager fp32`` (the same formula: our reference, the tests' oracle);
- ``torch.compile``: the reference under ``torch.compile`` (CUDA only: Inductor on CPU compiles for minutes).

Inputs as the towers make them: q and k are views of one packed qkv projection ``[T, 3 * H * D]``, cos/sin float32
``[T, D]``. Modes: ``fwd`` and ``fwd+bwd`` (gradient of the qkv projection through q and k; the tables come from a
buffer and need none). Bytes moved (the lower bound): q and k read and written once in their dtype, cos and sin read
once in float32; the backward moves the same. Default preset: the Qwen2.5-VL-7B tower (16 heads, head dim 80) at
4096 and 16384 packed tokens.
"""

from __future__ import annotations

import torch

from ...kernels.reference.rotary import rotary_embedding_reference
from ...ops.rotary_embedding import KERNEL_DTYPES, rotary_embedding
from ..suite import BenchConfig, Inputs, Shape, Suite, has_module, mmkernels_providers, register_suite

# (label, tokens T, heads H, head dim D)
SHAPES = {
    "quick": [("tiny tower", 64, 4, 80)],
    "default": [("Qwen2.5-VL-7B tower", 4096, 16, 80), ("Qwen2.5-VL-7B tower", 16384, 16, 80)],
}


def _hf_rotary():
    if not has_module("transformers"):
        return None
    try:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    except ImportError:  # a transformers release without Qwen2.5-VL
        return None
    return apply_rotary_pos_emb_vision


def _backend_limits(backend: str, config: BenchConfig) -> str | None:
    if config.dtype not in KERNEL_DTYPES:
        return f"the kernel takes {', '.join(str(d).replace('torch.', '') for d in KERNEL_DTYPES)}"
    if backend == "triton" and config.device.type == "cpu" and config.dtype == torch.bfloat16:
        return "the Triton interpreter mishandles bf16 on CPU (use --dtype fp32 or fp16)"
    return None


def _shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device, dtype = config.device, config.dtype
    hf = _hf_rotary()
    compiled = torch.compile(rotary_embedding_reference) if device.type == "cuda" else None
    shapes = []
    for label, t, h, d in SHAPES[config.preset]:
        def make_inputs(grad, t=t, h=h, d=d):
            qkv = torch.randn(t, 3 * h * d, device=device, dtype=dtype).requires_grad_(grad)
            angles = torch.randn(t, d // 2, device=device)
            angles = torch.cat((angles, angles), -1)  # HF's [T, D] layout (emb = cat(freqs, freqs))
            grad_out = ((torch.randn(t, h, d, device=device, dtype=dtype),
                         torch.randn(t, h, d, device=device, dtype=dtype)) if grad else None)
            return Inputs((qkv, angles.cos(), angles.sin()), wrt=(qkv,) if grad else (), grad_out=grad_out)

        def split(fn, h=h, d=d):
            # the towers' q and k: views of the packed projection, never copied by our op
            def run(qkv, cos, sin):
                q, k, _ = qkv.reshape(qkv.shape[0], 3, h, d).permute(1, 0, 2, 3).unbind(0)
                return tuple(fn(q, k, cos, sin))

            return run

        providers = mmkernels_providers(ours, lambda backend: split(
            lambda q, k, cos, sin: rotary_embedding(q, k, cos, sin, backend=backend)))
        baseline = "HF apply_rotary_pos_emb_vision" if hf is not None else "eager fp32"
        providers[baseline] = split(hf if hf is not None else rotary_embedding_reference)
        if compiled is not None:
            providers["torch.compile"] = split(compiled)
        elem = torch.finfo(dtype).bits // 8
        moved = 2.0 * elem * t * 2 * h * d + 2.0 * 4 * t * d  # q, k in and out; cos, sin in (float32)
        shapes.append(Shape(
            name=f"{label} T={t} H={h} D={d}",
            make_inputs=make_inputs,
            providers=providers,
            baseline=baseline,
            flops=3.0 * t * 2 * h * d,  # two products and a sum per output element
            bytes=moved,
            bwd_flops=3.0 * t * 2 * h * d,
            bwd_bytes=moved,
            params={"tokens": t, "heads": h, "head_dim": d},
        ))
    return shapes


def _tune_cases() -> list[dict]:
    return [{"dtype": dtype, "d": 80, "heads": 16, "t": t}
            for dtype in (torch.bfloat16, torch.float16) for t in (4096, 16384)]


register_suite(Suite(
    name="rotary_embedding",
    description="vision rotary embedding (rotate-half RoPE) of q and k in one launch vs HF apply_rotary_pos_emb_vision",
    shapes=_shapes,
    default_dtype=torch.bfloat16,
    cpu_dtype=torch.float32,
    ops=("rotary_embedding",),
    modes=("fwd", "fwd+bwd"),
    backend_limits=_backend_limits,
    tune_cases={"rotary_embedding": _tune_cases},
))
