"""``ViT``: a pre-norm Vision Transformer encoder on mmkernels ops, loading HF and timm weights.

``ViT(pixels) -> [B, L, D]``: the final hidden states after the last LayerNorm, i.e. HF's ``last_hidden_state``
(``ViTModel``, ``Blip2VisionModel``) and timm's ``forward_features``. Image sizes other than the configured one
are handled by resizing the position embedding with the convention of the library the weights came from
(``config.pos_interpolation``: ``"hf"`` or ``"timm"``; see :mod:`mmkernels.nn.patch_embed`).

Layout (also the state-dict key names, timm-like):
``patch_embed.{weight,bias,cls_token,pos_embed}``, ``norm_pre.*`` (only with ``pre_norm``),
``blocks.{i}.norm1.*``, ``blocks.{i}.attn.qkv.*`` (q, k, v fused ``[3D, D]``), ``blocks.{i}.attn.proj.*``,
``blocks.{i}.norm2.*``, ``blocks.{i}.mlp.fc1.*``, ``blocks.{i}.mlp.fc2.*``, ``norm.*``.

Attention-probability dropout is modelled (``ViTConfig.attention_dropout``, training mode only); hidden dropout and
stochastic depth are not (ViT front ends of multimodal models run them off; the converters warn when a source model
has them on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..nn.attention import Attention
from ..nn.patch_embed import PatchEmbed
from ..ops import _validate as check
from .convert import vit as _convert
from .vit_config import ACTIVATIONS, PRESETS, ViTConfig

__all__ = ["ACTIVATIONS", "PRESETS", "ViT", "ViTBlock", "ViTConfig"]


class ViTMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, **factory) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.fc2 = nn.Linear(hidden, dim, **factory)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.act == "gelu":
            x = F.gelu(x)
        elif self.act == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        else:
            x = x * torch.sigmoid(1.702 * x)
        return self.fc2(x)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: ViTConfig, *, backend: BackendChoice = None, **factory) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps, **factory)
        self.attn = Attention(d, config.num_heads, qkv_bias=config.qkv_bias, out_bias=True,
                              dropout=config.attention_dropout, backend=backend, **factory)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps, **factory)
        self.mlp = ViTMLP(d, config.mlp_dim, config.act, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT encoder. ``ViT(pixels [B, C, H, W]) -> [B, L, D]`` (after the final LayerNorm).

    Build with a :class:`ViTConfig`, a preset name (``"vit_b_16"``, ``"vit_l_14"``, ``"vit_h_14"``,
    ``"vit_g_14"``), or from a loaded model with :meth:`from_hf` / :meth:`from_timm` (no download).

    ``backend``: ``None``, a name or ``{op: name}`` over ``patch_embed`` and ``attention``; assigning
    ``vit.backend`` checks the whole choice (``BackendError``) and passes each part its share.
    """

    backend = ModuleBackend("patch_embed", "attention")

    def __init__(self, config: ViTConfig | str = "vit_b_16", *, backend: BackendChoice = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check.module_dtype("ViT", dtype)
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"ViT: unknown preset {config!r}; presets: {sorted(PRESETS)}")
            config = PRESETS[config]
        if not isinstance(config, ViTConfig):
            raise TypeError(f"ViT: config must be a ViTConfig or a preset name, got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(
            config.image_size, config.patch_size, config.in_channels, config.hidden_size, bias=True,
            cls_token=config.class_token, pos_embed=True, pos_interpolation=config.pos_interpolation, **factory,
        )
        self.norm_pre = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **factory) if config.pre_norm \
            else None
        self.blocks = nn.ModuleList([ViTBlock(config, **factory) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **factory)
        self._init_weights()
        # Last: checks the choice and hands the patch embedding and every block's attention its share.
        self.backend = backend

    @classmethod
    def preset(cls, name: str, **overrides) -> ViT:
        """A preset with some fields changed, e.g. ``ViT.preset("vit_l_14", image_size=336)``."""
        if name not in PRESETS:
            raise ValueError(f"ViT: unknown preset {name!r}; presets: {sorted(PRESETS)}")
        factory = {k: overrides.pop(k) for k in ("backend", "device", "dtype") if k in overrides}
        return cls(PRESETS[name].replace(**overrides), **factory)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))

    @property
    def num_prefix_tokens(self) -> int:
        return self.patch_embed.num_prefix_tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        check.tensor("pixels", pixels, dim=4, op="ViT")
        if pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"ViT: pixels must be [B, in_channels={self.config.in_channels}, H, W], got "
                             f"{tuple(pixels.shape)}")
        x = self.patch_embed(pixels)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    # -- converters (thin: mmkernels.models.convert.vit reads the config and the weights) ---------------------

    @classmethod
    def from_hf(cls, model, *, backend: BackendChoice = None) -> ViT:
        """From a loaded HF ``ViTModel`` (or ``ViTFor*``) or ``Blip2VisionModel``; weights are copied, nothing is
        downloaded. The result matches the model's ``last_hidden_state`` (with ``interpolate_pos_encoding=True``
        for other image sizes)."""
        return cls._from_state_dict(*_convert.from_hf(model), backend)

    @classmethod
    def from_timm(cls, model, *, backend: BackendChoice = None) -> ViT:
        """From a loaded timm ``VisionTransformer``; matches its ``forward_features``."""
        return cls._from_state_dict(*_convert.from_timm(model), backend)

    @classmethod
    def _from_state_dict(cls, config: ViTConfig, state_dict: dict, training: bool, backend: BackendChoice) -> ViT:
        ref = next(iter(state_dict.values()))
        with torch.device("meta"):
            vit = cls(config, backend=backend, dtype=ref.dtype)
        vit.load_state_dict(state_dict, strict=True, assign=True)
        vit.train(training)
        return vit
