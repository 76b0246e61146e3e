"""``patch_embed``: the fused ViT patch embedding against the timm/HF way of writing it.

Baselines (the reference implementation, so they never drift from the tests' oracle):
- ``eager (timm-style)``: ``conv2d(stride=P) -> flatten -> transpose -> cat cls -> add pos`` in PyTorch eager;
- ``torch.compile``: the same function under ``torch.compile`` (CUDA only: Inductor on CPU compiles for minutes).

Modes: ``fwd`` and ``fwd+bwd`` (gradients for weight, bias, cls token and position embedding; the pixels do not
need one, as in training a ViT on images). Default preset: ViT-B/16 at 224, ViT-L/14 at 336, ViT-g/14 at 224,
batch 256.
"""

from __future__ import annotations

import torch

from ...kernels.reference.patch_embed import patch_embed_reference
from ...ops.patch_embed import BACKENDS, KERNEL_DTYPES, patch_embed
from ..suite import BenchConfig, Case, Suite, register_suite

# (label, batch, channels, image size, patch size, embed dim)
SHAPES = {
    "quick": [("tiny/16", 4, 3, 32, 16, 64), ("tiny/14 d88", 2, 3, 28, 14, 176)],
    "default": [
        ("ViT-B/16 224", 256, 3, 224, 16, 768),
        ("ViT-L/14 336", 256, 3, 336, 14, 1024),
        ("ViT-g/14 224", 256, 3, 224, 14, 1408),
    ],
}
MODES = ("fwd", "fwd+bwd")


def _flops_bytes(b, c, s, p, d, elem, mode) -> tuple[float, float]:
    n = (s // p) ** 2
    seq = n + 1
    k = c * p * p
    gemm = 2.0 * b * n * k * d
    fwd_bytes = elem * (b * c * s * s + d * k + 2 * d + seq * d + b * seq * d)
    if mode == "fwd":
        return gemm, fwd_bytes
    # + weight gradient GEMM; backward reads grad_out and the pixels again, writes the parameter gradients
    bwd_bytes = elem * (b * seq * d + b * c * s * s + d * k + 2 * d + seq * d)
    return 2 * gemm, fwd_bytes + bwd_bytes


def _build(config: BenchConfig) -> list[Case]:
    device = config.device
    dtype = config.dtype or torch.bfloat16
    ours = [b for b in BACKENDS.available(device) if b != "reference" and (config.backends is None
                                                                         or b in config.backends)]
    if dtype not in KERNEL_DTYPES:
        ours = []
    compiled = torch.compile(patch_embed_reference) if device.type == "cuda" else None
    cases = []
    for label, b, c, s, p, d in SHAPES[config.preset]:
        for mode in MODES:
            train = mode == "fwd+bwd"

            def make_inputs(b=b, c=c, s=s, p=p, d=d, train=train):
                seq = (s // p) ** 2 + 1
                x = torch.randn(b, c, s, s, device=device, dtype=dtype)
                params = [torch.randn(d, c, p, p, device=device, dtype=dtype) * (c * p * p) ** -0.5,
                          torch.randn(d, device=device, dtype=dtype),
                          torch.randn(1, seq, d, device=device, dtype=dtype) * 0.02,
                          torch.randn(1, 1, d, device=device, dtype=dtype)]
                params = [t.requires_grad_(train) for t in params]
                grad = torch.randn(b, seq, d, device=device, dtype=dtype) if train else None
                return x, params, grad

            def wrap(fn, train=train):
                def run(inputs):
                    x, params, grad = inputs
                    out = fn(x, *params)
                    if train:
                        torch.autograd.grad(out, params, grad)
                    return out

                return run

            providers = {}
            for backend in ours:
                providers[f"mmkernels[{backend}]"] = wrap(
                    lambda x, w, bias, pos, cls, backend=backend: patch_embed(x, w, bias, pos_embed=pos, cls_token=cls,
                                                                              backend=backend))
            providers["eager (timm-style)"] = wrap(patch_embed_reference)
            if compiled is not None:
                providers["torch.compile"] = wrap(compiled)
            flops, nbytes = _flops_bytes(b, c, s, p, d, torch.finfo(dtype).bits // 8, mode)
            cases.append(Case(
                name=f"{label} B={b}",
                make_inputs=make_inputs,
                providers=providers,
                baseline="eager (timm-style)",
                mode=mode,
                flops=flops,
                bytes=nbytes,
                params={"batch": b, "channels": c, "image": s, "patch": p, "dim": d},
            ))
    return cases


register_suite(Suite(
    name="patch_embed",
    description="fused ViT patch embedding (implicit im2col GEMM + bias/cls/pos epilogue) vs conv2d->cat->add",
    build=_build,
    default_dtype=torch.bfloat16,
))
