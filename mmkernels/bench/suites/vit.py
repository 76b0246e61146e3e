"""``vit``: the whole ViT encoder (our :class:`mmkernels.models.ViT`) against HF ``ViTModel`` with SDPA attention.

Both run the same weights (ours converted from the HF model) at the same config, batch and dtype. Images/s is
``batch / median``; the rows' ``params`` carry the batch. Without ``transformers`` the HF provider is skipped and
the speed-up column is relative to ours. Modes: ``fwd`` (inference, no autograd) and ``fwd+bwd`` (gradients for
every parameter).
"""

from __future__ import annotations

import functools

import torch

from ..suite import BenchConfig, Inputs, Shape, Suite, has_module, mmkernels_providers, register_suite

# (label, HF ViTConfig fields, batch)
SHAPES = {
    "quick": [("tiny/8 32px", dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=128), 4)],
    "default": [
        ("ViT-B/16 224", dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072), 128),
        ("ViT-L/14 224", dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                              num_attention_heads=16, intermediate_size=4096), 64),
    ],
}
OURS, HF = "mmkernels ViT", "HF ViTModel (sdpa)"


def _flops(cfg: dict, batch: int) -> float:
    p, s, d, m = cfg["patch_size"], cfg["image_size"], cfg["hidden_size"], cfg["intermediate_size"]
    n = (s // p) ** 2
    seq = n + 1
    per_layer = 2 * seq * d * 3 * d + 4 * seq * seq * d + 2 * seq * d * d + 4 * seq * d * m
    return float(batch * (2 * n * 3 * p * p * d + cfg["num_hidden_layers"] * per_layer))


@functools.cache
def _hf_model(fields: tuple, device: torch.device, dtype: torch.dtype):
    """HF ViTModel with SDPA attention, or None without transformers. Built on first use (large models take a while
    to initialise)."""
    if not has_module("transformers"):
        return None
    import transformers

    cfg = transformers.ViTConfig(**dict(fields), attn_implementation="sdpa")
    return transformers.ViTModel(cfg, add_pooling_layer=False).to(device=device, dtype=dtype).eval()


def _config(fields: tuple):
    from ...models.vit import ViTConfig

    f = dict(fields)
    return ViTConfig(image_size=f["image_size"], patch_size=f["patch_size"], hidden_size=f["hidden_size"],
                     num_layers=f["num_hidden_layers"], num_heads=f["num_attention_heads"],
                     mlp_dim=f["intermediate_size"], layer_norm_eps=1e-12)


@functools.cache
def _our_model(fields: tuple, device: torch.device, dtype: torch.dtype, backend: str | None):
    """Ours, with the HF model's weights when transformers is installed."""
    from ...models.vit import ViT

    hf = _hf_model(fields, device, dtype)
    if hf is not None:
        return ViT.from_hf(hf, backend=backend).eval()
    return ViT(_config(fields), backend=backend, device=device, dtype=dtype).eval()


@functools.cache
def _param_count(fields: tuple) -> int:
    """The model's parameter count (ViT-B/16: 85,798,656), counted on the meta device (no memory, no init)."""
    from ...models.vit import ViT

    return sum(p.numel() for p in ViT(_config(fields), device="meta").parameters())


def _shapes(config: BenchConfig, ours: list) -> list[Shape]:
    device, dtype = config.device, config.dtype
    shapes = []
    for label, fields, batch in SHAPES[config.preset]:
        key = tuple(sorted(fields.items()))

        def make_inputs(grad, fields=fields, batch=batch):
            s, p, d = fields["image_size"], fields["patch_size"], fields["hidden_size"]
            pixels = torch.randn(batch, 3, s, s, device=device, dtype=dtype)
            grad_out = torch.randn(batch, (s // p) ** 2 + 1, d, device=device, dtype=dtype) if grad else None
            return Inputs((pixels,), grad_out=grad_out)

        providers = mmkernels_providers(
            ours, lambda b, key=key: lambda x: _our_model(key, device, dtype, b)(x), label=OURS)
        if has_module("transformers"):
            providers[HF] = lambda x, key=key: _hf_model(key, device, dtype)(x).last_hidden_state
        # Bytes, each tensor once: forward reads every parameter and the pixels [B, 3, S, S] and writes the hidden
        # states [B, (S/P)^2 + 1, D]; the backward (parameters' gradients; the pixels need none) reads the output
        # gradient, the parameters and the pixels (the patch-embedding weight gradient) and writes every gradient.
        elem = torch.finfo(dtype).bits // 8
        s, p, d = fields["image_size"], fields["patch_size"], fields["hidden_size"]
        pixels, hidden, weights = batch * 3 * s * s, batch * ((s // p) ** 2 + 1) * d, _param_count(key)
        shapes.append(Shape(
            name=f"{label} B={batch}",
            make_inputs=make_inputs,
            providers=providers,
            baseline=HF if HF in providers else next(iter(providers)),
            flops=_flops(fields, batch),
            bytes=float(elem * (weights + pixels + hidden)),
            bwd_bytes=float(elem * (2 * weights + hidden + pixels)),
            params={"batch": batch, **fields},
        ))
    return shapes


register_suite(Suite(
    name="vit",
    description="ViT encoder images/s (batch / median): mmkernels ViT vs HF ViTModel with SDPA, same weights",
    shapes=_shapes,
    default_dtype=torch.bfloat16,
    ops=("patch_embed", "attention"),
    modes=("fwd", "fwd+bwd"),
    model=True,
))
