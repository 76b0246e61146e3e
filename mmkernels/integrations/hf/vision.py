"""Patch embeddings of HF vision towers through :func:`mmkernels.ops.patch_embed` (one fused kernel: implicit
im2col GEMM + conv bias + cls token + position embedding).

Covered embedding classes (each reads its own parameters; nothing is copied or re-created):

- ``ViTEmbeddings``: ``patch_embeddings.projection`` (Conv2d with bias), ``cls_token``, ``position_embeddings``,
  ``interpolate_pos_encoding`` (the model's own bicubic resize, called for the new grid), then its dropout;
- ``CLIPVisionEmbeddings``: ``patch_embedding`` (no bias), ``class_embedding``, ``position_embedding(position_ids)``;
- ``SiglipVisionEmbeddings``: no cls token, ``position_embedding(position_ids)``;
- ``Blip2VisionEmbeddings`` / ``InstructBlipVisionEmbeddings``: ``class_embedding``, ``position_embedding``
  (sliced to the token count, as HF does);
- ``IdeficsVisionEmbeddings`` (IDEFICS v1's CLIP-style tower): as CLIP's;
- ``InternVLVisionEmbeddings`` (InternViT, the tower of InternVL): ``patch_embeddings.projection`` (Conv2d with
  bias), ``cls_token``, ``position_embeddings`` when the config has them (resized by the model's own
  ``interpolate_pos_encoding``, which it always calls), then its dropout.

A call the fused op cannot take runs the model's own forward (and is counted in the report): ViT's
``bool_masked_pos`` (mask tokens), an image size that is not a multiple of the patch size, a projection that is not
a plain stride-P Conv2d any more (e.g. a PEFT LoRA layer put in its place, a hook or another library's forward on
it: the model's own forward runs it, adapter included), a wrong channel count or image size (the model's own code
raises its usual error). Under accelerate (``cpu_offload``, ``device_map`` with offload) the conv's own hook loads its
offloaded weight around our read of it. Under autocast the GEMM runs in the autocast dtype, as Conv2d would,
and the result is cast back to the parameters' dtype, as HF's sum with the fp32 position embedding is.
"""

from __future__ import annotations

import torch
from torch import nn

from ...ops.patch_embed import patch_embed
from ._patching import PatchReport, materialized, op_backend, original_forward, plain_forward, swap_forward

__all__ = ["EMBEDDING_FAMILIES", "patch_vision_embeddings"]

# class name -> (attribute path of the Conv2d, has cls token, pos-embedding style)
EMBEDDING_FAMILIES = {
    "ViTEmbeddings": ("patch_embeddings.projection", "cls_token", "vit"),
    "CLIPVisionEmbeddings": ("patch_embedding", "class_embedding", "embedding"),
    "SiglipVisionEmbeddings": ("patch_embedding", None, "embedding"),
    "Blip2VisionEmbeddings": ("patch_embedding", "class_embedding", "blip2"),
    "InstructBlipVisionEmbeddings": ("patch_embedding", "class_embedding", "blip2"),
    "InternVLVisionEmbeddings": ("patch_embeddings.projection", "cls_token", "internvl"),
    "IdeficsVisionEmbeddings": ("patch_embedding", "class_embedding", "embedding"),
}
_STATE = "_mmkernels_patch_embed"  # (conv path, cls attr, style, report, backend) on the patched module


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _plain_conv(conv) -> bool:
    """A Conv2d our op computes exactly: square kernel == stride, no padding/dilation/groups, and calling it runs
    ``nn.Conv2d.forward`` itself (no hooks, no adapter or other library's forward; an accelerate hook is allowed: its
    offloaded weight is loaded around our read)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride == conv.kernel_size
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and plain_forward(conv))


def _pos_embed(self, style: str, n_tokens: int, dim: int, height: int, width: int, interpolate: bool,
               like: torch.Tensor) -> torch.Tensor:
    proxy = like.new_empty((0, n_tokens, dim))  # the models' resize reads only the token count and width
    if style == "vit":
        return self.interpolate_pos_encoding(proxy, height, width) if interpolate else self.position_embeddings
    if style == "internvl":  # absolute positions are optional; the model always resizes them (a no-op at its size)
        if self.position_embeddings is None:
            return None
        return self.interpolate_pos_encoding(proxy, height, width)
    if style == "embedding":
        if interpolate:
            return self.interpolate_pos_encoding(proxy, height, width)
        return self.position_embedding(self.position_ids)
    pos = self.interpolate_pos_encoding(proxy, height, width) if interpolate else self.position_embedding
    return pos[:, :n_tokens, :]


def _forward(self, pixel_values: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    conv_path, cls_attr, style, report, backend = self.__dict__[_STATE]
    names = {"vit": ("bool_masked_pos", "interpolate_pos_encoding"), "internvl": ("bool_masked_pos",)}.get(
        style, ("interpolate_pos_encoding",))
    given = dict(zip(names, args), **kwargs)
    interpolate = style == "internvl" or bool(given.get("interpolate_pos_encoding", False))
    bool_masked_pos = given.get("bool_masked_pos")
    conv = _get(self, conv_path)

    def fallback(reason: str):
        report.fallback(f"{type(self).__name__}: {reason}")
        return original_forward(self)(pixel_values, *args, **kwargs)

    if bool_masked_pos is not None:
        return fallback("bool_masked_pos (mask tokens)")
    wrapped = style in ("vit", "internvl")  # the conv sits in a patch-embeddings module whose forward we skip
    if not _plain_conv(conv) or (wrapped and not plain_forward(self.patch_embeddings)):
        return fallback("the patch projection is not a plain stride-P Conv2d any more")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != conv.in_channels:
        return original_forward(self)(pixel_values, *args, **kwargs)  # the model raises its own error
    _, _, h, w = pixel_values.shape
    p = conv.kernel_size[0]
    size = getattr(self, "image_size", None)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if not interpolate and style != "blip2" and (h, w) != size:
        return original_forward(self)(pixel_values, *args, **kwargs)  # the model raises its own error
    if h % p or w % p:
        return fallback(f"image size {h}x{w} is not a multiple of the patch size {p}")
    cls = getattr(self, cls_attr) if cls_attr is not None else None
    n_tokens = (1 if cls is not None else 0) + (h // p) * (w // p)
    skipped = (self.patch_embeddings, conv) if wrapped else (conv,)  # modules whose forward we do not call
    with materialized(*skipped):  # accelerate: their offloaded weights, loaded around our read (their hooks)
        dtype = conv.weight.dtype
        pos = _pos_embed(self, style, n_tokens, conv.out_channels, h, w, interpolate, conv.weight)
        if pos is not None and pos.shape[-2] != n_tokens:
            # More patches than positions: the model raises its own error.
            return original_forward(self)(pixel_values, *args, **kwargs)
        compute = dtype
        device = pixel_values.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and dtype in (torch.float32, torch.float64):
            compute = torch.get_autocast_dtype(device)  # what Conv2d would run in
        weight, bias = conv.weight.to(compute), None if conv.bias is None else conv.bias.to(compute)
    out = patch_embed(
        pixel_values.to(compute), weight, bias, pos_embed=None if pos is None else pos.to(compute),
        cls_token=None if cls is None else cls.to(compute), backend=op_backend(backend, "patch_embed"),
    )
    if out.dtype != dtype:
        out = out.to(dtype)
    dropout = getattr(self, "dropout", None)
    return dropout(out) if isinstance(dropout, nn.Module) else out


def patch_vision_embeddings(model: nn.Module, report: PatchReport, classes: dict[str, type], *,
                            backend: str | None = None) -> None:
    """Swap the forward of every covered embedding module in ``model`` (``classes``: name -> class, the ones this
    transformers has)."""
    for path, module in model.named_modules():
        name = type(module).__name__
        if name not in EMBEDDING_FAMILIES or classes.get(name) is not type(module):
            continue
        conv_path, cls_attr, style = EMBEDDING_FAMILIES[name]
        conv = _get(module, conv_path)
        missing = [a for a in (conv_path, cls_attr) if a is not None and _get(module, a) is None]
        missing += [a for a in ({"vit": ("position_embeddings",), "embedding": ("position_embedding", "position_ids"),
                                 "blip2": ("position_embedding",), "internvl": ()}[style]) if _get(module, a) is None]
        if missing or not hasattr(module, "interpolate_pos_encoding"):
            report.skip(path, "patch_embed", f"{name} has no {', '.join(missing) or 'interpolate_pos_encoding'} in "
                        "this transformers version")
            continue
        if not _plain_conv(conv):
            report.skip(path, "patch_embed", f"{conv_path} is not a plain stride-P Conv2d ({type(conv).__name__})")
            continue
        if swap_forward(module, _forward, "patch_embed", state=(_STATE, (conv_path, cls_attr, style, report, backend))):
            report.add(path, "patch_embed", module, "ops.patch_embed (conv + bias + cls + pos in one kernel)")
