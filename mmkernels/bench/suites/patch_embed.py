"""``patch_embed``: the fused ViT patch embedding against the timm/HF way of writing it.

Baselines (the reference implementation, so they never drift from the tests' oracle):
- ``eager (timm-style)``: ``conv2d(stride=P) -> flatten -> transpose -> cat cls -> add pos`` in PyTorch eager;
- ``torch.compile``: the same function under ``torch.compile`` (CUDA only: Inductor on CPU compiles for minutes).

Modes: ``fwd`` and ``fwd+bwd`` (gradients for weight, bias, cls token and position embedding; the pixels do not
need one, as in training a ViT on images). Default preset: ViT-B/16 at 224, ViT-L/14 at 336, ViT-g/14 at 224,
batch 256.

Flattened-patch rows (the Qwen2-VL / Qwen2.5-VL / Qwen3-VL towers: ``hidden_states`` ``[N, C*T*P*P]`` through a
Conv3d with stride = kernel, transformers#45750): ours (the same op over ``N`` one-patch images of ``C*T``
channels, as ``integrations.hf`` runs it) against the model's own ``conv3d`` (the baseline) and against ``F.linear``
on the flattened weight (the same GEMM through cuBLAS / MKL: what a hand fix of the Conv3d gives). Default preset:
16,384 tokens at Qwen2.5-VL-7B's (14 px, 1280 wide, no bias) and Qwen3-VL's (16 px, 1152 wide, bias) shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...kernels.reference.patch_embed import patch_embed_reference
from ...ops.patch_embed import KERNEL_DTYPES, patch_embed
from ..suite import BenchConfig, Inputs, Shape, Suite, mmkernels_providers, register_suite

# (label, tokens, channels, temporal patch, patch size, embed dim, bias): Qwen-VL's flattened patches
FLAT_SHAPES = {
    "quick": [("qwen tiny T2/4", 88, 3, 2, 4, 40, True)],
    "default": [("Qwen2.5-VL-7B T2/14", 16384, 3, 2, 14, 1280, False),
                ("Qwen3-VL T2/16", 16384, 3, 2, 16, 1152, True)],
}

# (label, batch, channels, image size, patch size, embed dim)
SHAPES = {
    "quick": [("tiny/16", 4, 3, 32, 16, 64), ("tiny/14 d88", 2, 3, 28, 14, 176)],
    "default": [
        ("ViT-B/16 224", 256, 3, 224, 16, 768),
        ("ViT-L/14 336", 256, 3, 336, 14, 1024),
        ("ViT-g/14 224", 256, 3, 224, 14, 1408),
    ],
}


def _backend_limits(backend: str, config: BenchConfig) -> str | None:
    if config.dtype not in KERNEL_DTYPES:
        return f"the kernels take {', '.join(str(d).replace('torch.', '') for d in KERNEL_DTYPES)}"
    if backend == "triton" and config.device.type == "cpu" and config.dtype == torch.bfloat16:
        return "the Triton interpreter mishandles bf16 on CPU (use --dtype fp32 or fp16)"
    return None


def _shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device, dtype = config.device, config.dtype
    compiled = torch.compile(patch_embed_reference) if device.type == "cuda" else None
    shapes = []
    for label, b, c, s, p, d in SHAPES[config.preset]:
        def make_inputs(grad, b=b, c=c, s=s, p=p, d=d):
            seq = (s // p) ** 2 + 1
            x = torch.randn(b, c, s, s, device=device, dtype=dtype)
            params = (torch.randn(d, c, p, p, device=device, dtype=dtype) * (c * p * p) ** -0.5,
                      torch.randn(d, device=device, dtype=dtype),
                      torch.randn(1, seq, d, device=device, dtype=dtype) * 0.02,
                      torch.randn(1, 1, d, device=device, dtype=dtype))
            params = tuple(t.requires_grad_(grad) for t in params)
            grad_out = torch.randn(b, seq, d, device=device, dtype=dtype) if grad else None
            return Inputs((x, *params), wrt=params, grad_out=grad_out)

        providers = mmkernels_providers(ours, lambda backend: lambda x, w, bias, pos, cls: patch_embed(
            x, w, bias, pos_embed=pos, cls_token=cls, backend=backend))
        providers["eager (timm-style)"] = patch_embed_reference
        if compiled is not None:
            providers["torch.compile"] = compiled
        # the pixels need no gradient (as in training a ViT on images): the backward is the weight-gradient GEMM
        # plus reading grad_out and the pixels again and writing the parameter gradients
        n = (s // p) ** 2
        k = c * p * p
        elem = torch.finfo(dtype).bits // 8
        gemm = 2.0 * b * n * k * d
        params_bytes = elem * (d * k + 2 * d + (n + 1) * d)
        shapes.append(Shape(
            name=f"{label} B={b}",
            make_inputs=make_inputs,
            providers=providers,
            baseline="eager (timm-style)",
            flops=gemm,
            bytes=elem * (b * c * s * s + b * (n + 1) * d) + params_bytes,
            bwd_flops=gemm,
            bwd_bytes=elem * (b * (n + 1) * d + b * c * s * s) + params_bytes,
            params={"batch": b, "channels": c, "image": s, "patch": p, "dim": d},
        ))
    return shapes + _flat_shapes(config, ours)


def _flat_shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    """The flattened-patch rows: ``[N, C*T*P*P] x [D, C, T, P, P]^T (+ bias)``."""
    device, dtype = config.device, config.dtype
    shapes = []
    for label, n, c, t, p, d, has_bias in FLAT_SHAPES.get(config.preset, []):
        k = c * t * p * p

        def make_inputs(grad, n=n, c=c, t=t, p=p, d=d, k=k, has_bias=has_bias):
            x = torch.randn(n, k, device=device, dtype=dtype)
            params = [torch.randn(d, c, t, p, p, device=device, dtype=dtype) * k ** -0.5]
            if has_bias:
                params.append(torch.randn(d, device=device, dtype=dtype))
            params = tuple(w.requires_grad_(grad) for w in params)
            return Inputs((x, *params), wrt=params,
                          grad_out=torch.randn(n, d, device=device, dtype=dtype) if grad else None)

        def conv3d(x, w, bias=None, c=c, t=t, p=p):  # transformers' Qwen2_5_VisionPatchEmbed.forward
            return torch.nn.functional.conv3d(x.view(-1, c, t, p, p), w, bias, stride=(t, p, p)).view(x.shape[0], -1)

        def linear(x, w, bias=None):
            return torch.nn.functional.linear(x, w.reshape(w.shape[0], -1), bias)

        def ours_call(backend, c=c, t=t, p=p):
            return lambda x, w, bias=None: patch_embed(x.view(-1, c * t, p, p), w.reshape(w.shape[0], c * t, p, p),
                                                       bias, backend=backend).view(x.shape[0], -1)

        providers = mmkernels_providers(ours, ours_call)
        providers["HF Conv3d"] = conv3d
        providers["F.linear"] = linear
        elem = torch.finfo(dtype).bits // 8
        gemm = 2.0 * n * k * d
        weights = elem * (d * k + (d if has_bias else 0))
        shapes.append(Shape(
            name=f"{label} N={n}",
            make_inputs=make_inputs,
            providers=providers,
            baseline="HF Conv3d",
            flops=gemm,
            bytes=elem * (n * k + n * d) + weights,
            bwd_flops=gemm,  # the weight gradient (the patches need none)
            bwd_bytes=elem * (n * d + n * k) + weights,
            params={"tokens": n, "channels": c, "temporal_patch": t, "patch": p, "dim": d, "bias": has_bias},
        ))
    return shapes


# ---- tune cases: the representative problems `mmkernels-bench tune` sweeps for this family's kernels ----------

_TUNE_DTYPES = (torch.bfloat16, torch.float16)


_PATCH_PROBLEMS = ((8, 3, 224, 16, 768), (4, 3, 336, 14, 1024), (4, 3, 224, 14, 1408))  # ViT-B/16, -L/14@336, -g/14


def _patch_roles(role: str, b: int, c: int, hw: int, p: int, d: int) -> tuple[int, int, int]:
    n = (hw // p) ** 2
    kk = c * p * p
    return {"fwd": (b * (n + 1), d, kk), "bwd_input": (b * n, kk, d), "bwd_weight": (d, kk, b * n)}[role]


def _patch_cases(role: str) -> Callable[[], list[dict]]:
    def make() -> list[dict]:
        out = []
        for dtype in _TUNE_DTYPES:
            for problem in _PATCH_PROBLEMS:
                m, n, k = _patch_roles(role, *problem)
                out.append({"dtype": dtype, "m": m, "n": n, "k": k, "problem": problem})
        return out

    return make


register_suite(Suite(
    name="patch_embed",
    description="fused ViT patch embedding (implicit im2col GEMM + bias/cls/pos epilogue) vs conv2d->cat->add; "
                "Qwen-VL flattened patches vs their Conv3d",
    shapes=_shapes,
    default_dtype=torch.bfloat16,
    ops=("patch_embed",),
    modes=("fwd", "fwd+bwd"),
    reference_is_baseline=True,
    backend_limits=_backend_limits,
    tune_cases={f"patch_embed_{role}": _patch_cases(role) for role in ("fwd", "bwd_input", "bwd_weight")},
))
