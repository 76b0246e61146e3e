"""``PatchEmbed``: the patch embedding of a ViT (conv stride P, cls token, position embedding) as one fused op.

The state dict is that of ``nn.Conv2d(C, D, P, stride=P)`` (``weight`` ``[D, C, P, P]``, ``bias`` ``[D]``) plus,
when enabled, ``cls_token`` ``[1, 1, D]`` and ``pos_embed`` ``[1, L, D]`` (the shapes HF and timm use).

Position embeddings for other image sizes are resized with one of two conventions, which give different numbers
(each matches its own library exactly):

- ``"hf"``: Hugging Face ViT / BLIP-2 ``interpolate_pos_encoding``: bicubic, ``align_corners=False``, no
  antialiasing, computed in the embedding's dtype.
- ``"timm"``: timm ``resample_abs_pos_embed``: bicubic with ``antialias=True`` (a different cubic kernel, and
  low-pass when shrinking), computed in float32 and cast back.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as v
from ..ops.patch_embed import patch_embed

__all__ = ["POS_INTERPOLATIONS", "PatchEmbed", "interpolate_pos_embed"]

POS_INTERPOLATIONS = ("hf", "timm")
_NAME = "PatchEmbed"


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy.int64 too, never a bool


def _pair(x, name: str) -> tuple[int, int]:
    if _is_int(x):
        return (int(x), int(x))
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_int(i) for i in x):
        return (int(x[0]), int(x[1]))
    raise TypeError(f"{_NAME}: {name} must be an int or a pair of ints, got {x!r}")


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    mode: str = "hf",
) -> torch.Tensor:
    """Resize a learned position embedding ``[1, prefix + Ho*Wo, D]`` to ``[1, prefix + Hn*Wn, D]``.

    The first ``num_prefix_tokens`` rows (the cls token's) are kept as they are; the patch rows are viewed as a
    ``Ho x Wo`` grid (row-major) and resized bicubically with the ``mode`` convention (``"hf"`` or ``"timm"``,
    see the module docstring). Differentiable. Returns the input unchanged when the grids are equal.
    """
    v.choice("mode", mode, POS_INTERPOLATIONS, op="interpolate_pos_embed")
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if pos_embed.dim() == 2:
        pos_embed = pos_embed.unsqueeze(0)
    dim = pos_embed.shape[-1]
    if pos_embed.shape[1] != num_prefix_tokens + old_grid[0] * old_grid[1]:
        raise ValueError(
            f"interpolate_pos_embed: pos_embed has {pos_embed.shape[1]} rows, expected {num_prefix_tokens} prefix + "
            f"{old_grid[0]}x{old_grid[1]} grid = {num_prefix_tokens + old_grid[0] * old_grid[1]}"
        )
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    if mode == "hf":
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=True)
        grid = grid.to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Patch embedding: ``[B, C, H, W] -> [B, (1 if cls) + (H/P)*(W/P), D]`` through :func:`mmkernels.ops.patch_embed`.

    Args:
        image_size: the image size the position embedding is trained for (int or (H, W)); other sizes are
            interpolated (see ``pos_interpolation``).
        patch_size: P.
        in_channels: C.
        embed_dim: D.
        bias: conv bias (``bias`` ``[D]``).
        cls_token: learn a cls token ``[1, 1, D]``, prepended as token 0.
        pos_embed: learn a position embedding ``[1, L, D]`` (L counts the cls token when there is one).
        pos_interpolation: ``"hf"`` or ``"timm"``: how ``pos_embed`` is resized for other image sizes.
        backend: backend of the op: ``None`` (auto), a name, or ``{"patch_embed": name}``; checked here.
    """

    backend = ModuleBackend("patch_embed")

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        *,
        bias: bool = True,
        cls_token: bool = False,
        pos_embed: bool = False,
        pos_interpolation: str = "hf",
        backend: BackendChoice = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        v.module_dtype(_NAME, dtype)
        self.patch_size = v.integer("patch_size", patch_size, op=_NAME, low=1)
        self.in_channels = v.integer("in_channels", in_channels, op=_NAME, low=1)
        self.embed_dim = v.integer("embed_dim", embed_dim, op=_NAME, low=1)
        self.image_size = _pair(image_size, "image_size")
        if any(s % self.patch_size or s < self.patch_size for s in self.image_size):
            raise ValueError(f"{_NAME}: image_size {self.image_size} must be positive multiples of "
                             f"patch_size {self.patch_size}")
        self.grid_size = (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_interpolation = v.choice("pos_interpolation", pos_interpolation, POS_INTERPOLATIONS, op=_NAME)
        bias, cls_token, pos_embed = (v.flag(name, value, op=_NAME) for name, value in
                                      (("bias", bias), ("cls_token", cls_token), ("pos_embed", pos_embed)))
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        d = self.embed_dim
        self.weight = nn.Parameter(torch.empty(d, self.in_channels, self.patch_size, self.patch_size, **factory))
        self.bias = nn.Parameter(torch.empty(d, **factory)) if bias else None
        self.num_prefix_tokens = 1 if cls_token else 0
        self.cls_token = nn.Parameter(torch.empty(1, 1, d, **factory)) if cls_token else None
        seq = self.num_prefix_tokens + self.num_patches
        self.pos_embed = nn.Parameter(torch.empty(1, seq, d, **factory)) if pos_embed else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation for weight and bias; ViT-style small normals for the tokens
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.patch_size * self.patch_size
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"embed_dim={self.embed_dim}, bias={self.bias is not None}, cls_token={self.cls_token is not None}, "
            f"pos_embed={self.pos_embed is not None}, pos_interpolation={self.pos_interpolation!r}"
        )

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return (height // self.patch_size, width // self.patch_size)

    def interpolate_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The position embedding ``[1, L, D]`` for a ``grid`` of patches (resized when it is not the trained one)."""
        if self.pos_embed is None:
            return None
        return interpolate_pos_embed(self.pos_embed, self.grid_size, grid, num_prefix_tokens=self.num_prefix_tokens,
                                     mode=self.pos_interpolation)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        v.tensor("pixels", pixels, dim=4, op=_NAME)
        if not pixels.is_floating_point():
            raise TypeError(f"{_NAME}: pixels must be a floating-point tensor, got {pixels.dtype} (convert uint8 "
                            "images with .float() and normalise them first)")
        if pixels.shape[1] != self.in_channels:
            raise ValueError(f"{_NAME}: pixels must be [B, in_channels={self.in_channels}, H, W], got "
                             f"{tuple(pixels.shape)}")
        if pixels.device != self.weight.device:
            raise ValueError(f"{_NAME}: input pixels is on {pixels.device} but the module's weights are on "
                             f"{self.weight.device}")
        if pixels.dtype != self.weight.dtype:
            pixels = pixels.to(self.weight.dtype)  # as HF and timm do: the input follows the weights
        h, w = pixels.shape[-2:]
        pos = None
        if self.pos_embed is not None:
            if h % self.patch_size or w % self.patch_size:
                raise ValueError(f"{_NAME}: image size H x W = {h} x {w} must be multiples of the patch size "
                                 f"P={self.patch_size}")
            pos = self.interpolate_pos_embed(self.grid_for(h, w))
        return patch_embed(pixels, self.weight, self.bias, pos_embed=pos, cls_token=self.cls_token,
                           backend=self._backends["patch_embed"])
