"""``vit``: the whole ViT encoder (our :class:`mmkernels.models.ViT`) against HF ``ViTModel`` with SDPA attention.

Both run the same weights (ours converted from the HF model) at the same config, batch and dtype. Images/s is
``batch / median``; the rows' ``params`` carry the batch. Without ``transformers`` the HF provider is skipped and
the speed-up column is relative to ours. Modes: ``fwd`` (inference, no autograd) and ``fwd+bwd`` (gradients for
every parameter).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..suite import BenchConfig, Case, Suite, register_suite

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
MODES = ("fwd", "fwd+bwd")
OURS, HF = "mmkernels ViT", "HF ViTModel (sdpa)"


def _flops(cfg: dict, batch: int) -> float:
    p, s, d, m = cfg["patch_size"], cfg["image_size"], cfg["hidden_size"], cfg["intermediate_size"]
    n = (s // p) ** 2
    seq = n + 1
    per_layer = 2 * seq * d * 3 * d + 4 * seq * seq * d + 2 * seq * d * d + 4 * seq * d * m
    return float(batch * (2 * n * 3 * p * p * d + cfg["num_hidden_layers"] * per_layer))


def _has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _build(config: BenchConfig) -> list[Case]:
    from ...models.vit import ViT, ViTConfig

    device = config.device
    dtype = config.dtype or torch.bfloat16
    have_hf = _has_transformers()
    cases = []
    for label, fields, batch in SHAPES[config.preset]:
        key = tuple(sorted(fields.items()))

        @functools.cache
        def models(fields=key):
            """Built on first use (large models take a while to initialise)."""
            fields = dict(fields)
            if have_hf:
                import transformers

                cfg = transformers.ViTConfig(**fields, attn_implementation="sdpa")
                hf = transformers.ViTModel(cfg, add_pooling_layer=False).to(device=device, dtype=dtype).eval()
                ours = ViT.from_hf(hf).eval()
                return ours, hf
            cfg = ViTConfig(image_size=fields["image_size"], patch_size=fields["patch_size"],
                            hidden_size=fields["hidden_size"], num_layers=fields["num_hidden_layers"],
                            num_heads=fields["num_attention_heads"], mlp_dim=fields["intermediate_size"],
                            layer_norm_eps=1e-12)
            return ViT(cfg, device=device, dtype=dtype).eval(), None

        for mode in MODES:
            train = mode == "fwd+bwd"

            def make_inputs(fields=fields, batch=batch):
                s = fields["image_size"]
                return torch.randn(batch, 3, s, s, device=device, dtype=dtype)

            def ours_fn(x, train=train, models=models):
                model = models()[0]
                if not train:
                    with torch.no_grad():
                        return model(x)
                out = model(x)
                out.float().square().mean().backward()
                return out

            def hf_fn(x, train=train, models=models):
                model = models()[1]
                if not train:
                    with torch.no_grad():
                        return model(x).last_hidden_state
                out = model(x).last_hidden_state
                out.float().square().mean().backward()
                return out

            providers = {OURS: ours_fn}
            if have_hf:
                providers[HF] = hf_fn
            cases.append(Case(
                name=f"{label} B={batch}",
                make_inputs=make_inputs,
                providers=providers,
                baseline=HF if have_hf else OURS,
                mode=mode,
                flops=_flops(fields, batch) * (3 if train else 1),
                params={"batch": batch, **fields},
            ))
    return cases


register_suite(Suite(
    name="vit",
    description="ViT encoder images/s (batch / median): mmkernels ViT vs HF ViTModel with SDPA, same weights",
    build=_build,
    default_dtype=torch.bfloat16,
))
