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

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._backends import BackendChoice, resolve_backends
from ..nn.attention import Attention
from ..nn.patch_embed import POS_INTERPOLATIONS, PatchEmbed
from ..ops import _validate as check

__all__ = ["PRESETS", "ViT", "ViTBlock", "ViTConfig"]

_NAME = "ViTConfig"

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT encoder. ``head_dim = hidden_size // num_heads``."""

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    act: str = "gelu"  # "gelu" (erf), "gelu_tanh", "quick_gelu" (CLIP)
    class_token: bool = True
    pre_norm: bool = False  # a LayerNorm after the embeddings (CLIP-style)
    pos_interpolation: str = "hf"  # how the position embedding is resized for other image sizes
    attention_dropout: float = 0.0  # on the attention probabilities, in training mode (HF attention_probs_dropout_prob)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, tuple | list):
            if len(self.image_size) != 2:
                raise ValueError(f"{_NAME}: image_size must be an int or (height, width), got {self.image_size!r}")
            for i, size in enumerate(self.image_size):
                check.integer(f"image_size[{i}]", size, op=_NAME, low=1)
        else:
            check.integer("image_size", self.image_size, op=_NAME, low=1)
        for field in ("patch_size", "in_channels", "hidden_size", "num_heads", "mlp_dim"):
            check.integer(field, getattr(self, field), op=_NAME, low=1)
        check.integer("num_layers", self.num_layers, op=_NAME, low=0)
        check.real("layer_norm_eps", self.layer_norm_eps, op=_NAME, low=0.0)
        check.real("attention_dropout", self.attention_dropout, op=_NAME, low=0.0)
        if self.attention_dropout >= 1.0:
            raise ValueError(f"{_NAME}: attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig: act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"ViTConfig: pos_interpolation must be one of {POS_INTERPOLATIONS}, "
                             f"got {self.pos_interpolation!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> ViTConfig:
        """``"vit_b_16"``, ``"vit_l_14"``, ``"vit_h_14"`` or ``"vit_g_14"``."""
        if name not in PRESETS:
            raise ValueError(f"{_NAME}: unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, ViTConfig] = {
    # ViT-B/16 (Dosovitskiy et al.; google/vit-base-patch16-224)
    "vit_b_16": ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    # ViT-L/14 (CLIP ViT-L/14 shapes, LLaVA's vision tower; at 336 px: image_size=336)
    "vit_l_14": ViTConfig(image_size=224, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    # ViT-H/14 (OpenCLIP ViT-H/14)
    "vit_h_14": ViTConfig(image_size=224, patch_size=14, hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120),
    # ViT-g/14 as used by BLIP-2 (EVA-CLIP g, first 39 layers): head dim 1408/16 = 88
    "vit_g_14": ViTConfig(image_size=224, patch_size=14, hidden_size=1408, num_layers=39, num_heads=16, mlp_dim=6144),
}


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

    def __init__(self, config: ViTConfig, *, backend: str | None = None, **factory) -> None:
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
    """

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
        self._backend_choice = backend
        backends = resolve_backends("ViT", backend, ("patch_embed", "attention"))
        factory = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(
            config.image_size, config.patch_size, config.in_channels, config.hidden_size, bias=True,
            cls_token=config.class_token, pos_embed=True, pos_interpolation=config.pos_interpolation,
            backend=backends["patch_embed"], **factory,
        )
        self.norm_pre = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **factory) if config.pre_norm \
            else None
        self.blocks = nn.ModuleList([ViTBlock(config, backend=backends["attention"], **factory)
                                     for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **factory)
        self._init_weights()

    @property
    def backend(self) -> BackendChoice:
        """The backend choice; assigning it checks it (``BackendError``) and passes it to the patch embedding and
        every block's attention."""
        return self._backend_choice

    @backend.setter
    def backend(self, value: BackendChoice) -> None:
        backends = resolve_backends("ViT", value, ("patch_embed", "attention"))
        self.patch_embed.backend = backends["patch_embed"]
        for block in self.blocks:
            block.attn.backend = backends["attention"]
        self._backend_choice = value

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

    # -- converters ---------------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, model, *, backend: str | None = None) -> ViT:
        """From a loaded HF ``ViTModel`` (or ``ViTFor*``) or ``Blip2VisionModel``; weights are copied, nothing is
        downloaded. The result matches the model's ``last_hidden_state`` (with ``interpolate_pos_encoding=True``
        for other image sizes)."""
        from .convert.vit import _unwrap_hf, hf_to_mmkernels, vit_config_from_hf

        model = _unwrap_hf(model)
        config = vit_config_from_hf(model.config)
        return cls._from_state_dict(config, hf_to_mmkernels(model.state_dict(), num_layers=config.num_layers),
                                    model, backend)

    @classmethod
    def from_timm(cls, model, *, backend: str | None = None) -> ViT:
        """From a loaded timm ``VisionTransformer``; matches its ``forward_features``."""
        from .convert.vit import timm_to_mmkernels, vit_config_from_timm

        config = vit_config_from_timm(model)
        return cls._from_state_dict(config, timm_to_mmkernels(model.state_dict(), num_layers=config.num_layers),
                                    model, backend)

    @classmethod
    def _from_state_dict(cls, config: ViTConfig, state_dict: dict, model, backend) -> ViT:
        ref = next(iter(state_dict.values()))
        with torch.device("meta"):
            vit = cls(config, backend=backend, dtype=ref.dtype)
        vit.load_state_dict(state_dict, strict=True, assign=True)
        vit.train(getattr(model, "training", False))
        return vit
