"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers: packed (native-resolution) images and video through mmkernels ops.

These towers take every image and video of a batch as one packed sequence of pre-flattened patches
(``hidden_states`` ``[total_patches, C * T * P * P]``, ``grid_thw`` ``[n, 3]``) and attend within each frame
(``cu_seqlens``) or, in most Qwen2.5-VL layers, within windows of 64 merged tokens (``cu_window_seqlens``).
``patch`` swaps the forward of three kinds of module (parameters, buffers and sub-modules are never touched):

- the patch embedding (``PatchEmbed`` / ``Qwen2_5_VisionPatchEmbed`` / ``Qwen3VLVisionPatchEmbed``): its Conv3d with
  stride = kernel over pre-flattened patches is one GEMM (``[N, K] x [K, D]`` + bias). It runs as
  :func:`mmkernels.ops.patch_embed` over ``N`` one-patch "images" of ``C * T`` channels (forward and backward in
  the weight's dtype; no Conv3d, no unfold);
- the vision attention (``VisionAttention`` / ``Qwen2_5_VLVisionAttention`` / ``Qwen3VLVisionAttention``): the
  module's own ``qkv`` Linear, then :func:`mmkernels.ops.rotary_embedding` on q and k in one launch (HF's
  rotate-half 2-D RoPE, in fp32, from the tower's cos/sin), then **one** varlen :func:`mmkernels.ops.attention`
  call over the tower's ``cu_seqlens`` (full layers) or ``cu_window_seqlens`` (window layers), then its ``proj``.
  transformers hands the packed ``cu_seqlens`` only to implementations whose name contains ``"flash"``
  (``transformers.utils.generic.is_flash_attention_requested``) and loops image by image for any other, a
  ``.tolist()`` per layer included; owning the module's forward gives the packed call whatever the config names,
  and is where the rotary has to go (HF applies it before any attention function is called);
- the tower (``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformerPretrainedModel`` /
  ``Qwen3VLVisionModel``): before the model's own forward runs, ``grid_thw`` is read **once**; the position ids,
  ``cu_seqlens`` (and Qwen2.5-VL's window index and ``cu_window_seqlens``) are computed by transformers' own
  ``vision_utils`` functions on a host copy of it (their per-image loops then read host memory, not the device) and
  sent to the device once; the longest frame and window come from the grid (checked against transformers' segments
  under :func:`mmkernels.debug_checks`). All of it is handed to the model's forward through the keyword arguments
  those functions take precomputed values from. No layer reads the device: the attention calls get ``max_seqlen_*``
  and launch without a sync. (A caller's own precomputed segments are kept; the maximum lengths are then read from
  them, one more host read, whatever ``max_seqlen`` the caller gave.)

A call the ops cannot take runs the module's own forward and is counted in the report: attention weights asked for
(``output_attentions``; the model's own implementation gives what it gives unpatched), no position embeddings, a
head dim above 256, a projection that is not a plain Conv3d with stride = kernel any more (e.g. a PEFT adapter).
The merger, the MLPs and the norms stay the model's.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..._config import debug_checks_enabled
from ...ops.attention import MAX_HEAD_DIM, attention
from ...ops.patch_embed import patch_embed
from ...ops.rotary_embedding import rotary_embedding
from ._patching import (
    PatchReport,
    family_classes,
    materialized,
    op_backend,
    original_forward,
    plain_forward,
    swap_forward,
    weights_recorded,
)

__all__ = ["PACKED_TOWERS", "patch_packed_towers"]

# modeling module -> (tower classes, vision attention classes, patch-embedding classes)
PACKED_TOWERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "transformers.models.qwen2_vl.modeling_qwen2_vl": (
        ("Qwen2VisionTransformerPretrainedModel",), ("VisionAttention",), ("PatchEmbed",)),
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl": (
        ("Qwen2_5_VisionTransformerPretrainedModel",), ("Qwen2_5_VLVisionAttention",), ("Qwen2_5_VisionPatchEmbed",)),
    "transformers.models.qwen3_vl.modeling_qwen3_vl": (
        ("Qwen3VLVisionModel",), ("Qwen3VLVisionAttention",), ("Qwen3VLVisionPatchEmbed",)),
}
_STATE = "_mmkernels_packed_tower"  # (report, backend) on each patched module
_ATTENTION_DETAIL = "one varlen ops.attention per block over cu_seqlens / cu_window_seqlens (no per-image loop)"
_ROTARY_DETAIL = "ops.rotary_embedding: HF's 2-D vision RoPE on q and k in one launch"
_EMBED_DETAIL = "ops.patch_embed: the stride = kernel Conv3d over flattened patches as one GEMM (+ bias)"
_TOWER_DETAIL = "cu_seqlens and max lengths once per forward (one host read), handed to every block"


# -- the tower: sequence lengths once per forward -------------------------------------------------------------------

def _vision_utils():
    try:
        return importlib.import_module("transformers.vision_utils")
    except ImportError:
        return None


# What the tower's forward takes precomputed (transformers' vision_utils pop these from its keyword arguments).
_PRECOMPUTED = ("position_ids", "cu_seqlens", "max_seqlen", "window_index", "cu_window_seqlens", "max_window_seqlen")


def _window_max(grid: list, merge: int, window: int, patch: int) -> int:
    """The longest window of ``get_vision_window_index``: windows of ``window // merge // patch`` merged tokens a side
    tile each frame from its top-left corner, so the first one is the largest:
    ``merge**2 * min(side, h // merge) * min(side, w // merge)``."""
    side = window // merge // patch
    return max((merge * merge * min(side, h // merge) * min(side, w // merge) for _, h, w in grid), default=0)


def _checked_max(name: str, cu: torch.Tensor, expected: int) -> None:
    """Debug checks: the maximum derived from ``grid_thw`` is the one transformers' own ``cu`` has."""
    got = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if got != expected:
        raise RuntimeError(f"mmkernels.integrations.hf.qwen_vl: {name} from grid_thw is {expected}, transformers' "
                           f"own segments give {got}: this transformers release lays the tower out differently")


def _max_len(cu: torch.Tensor) -> torch.Tensor:
    return (cu[1:] - cu[:-1]).max() if cu.numel() > 1 else cu.new_zeros(())


def _tower_forward(self, hidden_states, grid_thw=None, *args, **kwargs):
    if args or not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[-1] != 3 \
            or torch.compiler.is_compiling():
        return original_forward(self)(hidden_states, grid_thw, *args, **kwargs)
    vu = _vision_utils()
    grid = grid_thw.tolist()  # the one host read of this forward
    if not grid:
        return original_forward(self)(hidden_states, grid_thw, **kwargs)  # no image: the model's own code and error
    # transformers' own helpers, on a host copy built from that list: they loop over images and read sizes
    # (a device sync each when grid_thw is on the GPU), here without a wait; their results go to the device once.
    host, device = torch.tensor(grid, dtype=grid_thw.dtype), grid_thw.device
    merge = self.spatial_merge_size
    windowed = hasattr(self, "fullatt_block_indexes") and hasattr(self, "window_size")  # Qwen2.5-VL's window layers
    if any(k in kwargs for k in _PRECOMPUTED):
        return _tower_with_callers_values(self, hidden_states, grid_thw, host, windowed, kwargs)
    pre = dict(position_ids=vu.get_vision_position_ids(host, merge).to(device),
               cu_seqlens=vu.get_vision_cu_seqlens(host).to(device),
               max_seqlen=max(h * w for _, h, w in grid))  # one segment per frame
    if debug_checks_enabled():
        _checked_max("max_seqlen", pre["cu_seqlens"], pre["max_seqlen"])
    if windowed:
        window_index, cu_window = vu.get_vision_window_index(host, spatial_merge_size=merge,
                                                             window_size=self.window_size, patch_size=self.patch_size)
        pre.update(window_index=window_index.to(device), cu_window_seqlens=cu_window.to(device),
                   max_window_seqlen=_window_max(grid, merge, self.window_size, self.patch_size))
        if debug_checks_enabled():
            _checked_max("max_window_seqlen", cu_window, pre["max_window_seqlen"])
    return original_forward(self)(hidden_states, grid_thw, **kwargs, **pre)


def _tower_with_callers_values(self, hidden_states, grid_thw, host, windowed: bool, kwargs: dict):
    """A caller passed some of the precomputed values: its segments are kept (the ones it left out are computed as
    transformers would), and the maximum lengths are always the segments' own, read in one transfer: a smaller
    ``max_seqlen`` would cut sequences short and a larger one is not a packed length our kernels take."""
    vu, device = _vision_utils(), grid_thw.device
    if kwargs.get("cu_seqlens") is None:
        kwargs["cu_seqlens"] = vu.get_vision_cu_seqlens(host).to(device)
    lengths = [_max_len(kwargs["cu_seqlens"])]
    if windowed:
        if kwargs.get("window_index") is None or kwargs.get("cu_window_seqlens") is None:
            window_index, cu_window = vu.get_vision_window_index(
                host, spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
                patch_size=self.patch_size)
            kwargs.update(window_index=window_index.to(device), cu_window_seqlens=cu_window.to(device))
        lengths.append(_max_len(kwargs["cu_window_seqlens"]))
    maxima = torch.stack([t.to(torch.int64) for t in lengths]).tolist()  # one more read: the caller's segments
    kwargs["max_seqlen"] = maxima[0]
    if windowed:
        kwargs["max_window_seqlen"] = maxima[1]
    return original_forward(self)(hidden_states, grid_thw, **kwargs)


# -- the vision attention: rotary + one packed attention call -------------------------------------------------------

def _attention_forward(self, hidden_states, cu_seqlens=None, position_embeddings=None, max_seqlen=None, *args,
                       **kwargs):
    report, backend = self.__dict__[_STATE]

    def fallback(reason: str):
        report.fallback(f"{type(self).__name__}: {reason}")
        return original_forward(self)(hidden_states, cu_seqlens, position_embeddings, max_seqlen, *args, **kwargs)

    if args or not isinstance(cu_seqlens, torch.Tensor) or not isinstance(hidden_states, torch.Tensor) \
            or hidden_states.dim() != 2:
        return original_forward(self)(hidden_states, cu_seqlens, position_embeddings, max_seqlen, *args, **kwargs)
    if weights_recorded(self, kwargs):
        return fallback("output_attentions=True needs the attention weights")
    if position_embeddings is None:
        return fallback("no position_embeddings (cos, sin) given")
    if self.head_dim > MAX_HEAD_DIM or self.head_dim % 2:
        return fallback(f"head dim {self.head_dim} (the kernels take even head dims up to {MAX_HEAD_DIM})")
    tokens = hidden_states.shape[0]
    cos, sin = position_embeddings
    if cos.shape[0] != tokens or sin.shape[0] != tokens:  # patches and grid_thw disagree: the model's own error
        return original_forward(self)(hidden_states, cu_seqlens, position_embeddings, max_seqlen, *args, **kwargs)
    q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).unbind(1)  # [T, H, D] views
    q, k = rotary_embedding(q, k, cos, sin, backend=op_backend(backend, "rotary_embedding"))
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    longest = int(max_seqlen) if max_seqlen is not None else None
    dropout = self.attention_dropout if self.training else 0.0
    out = attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                    softmax_scale=self.scaling, dropout_p=dropout, backend=op_backend(backend, "attention"))
    return self.proj(out.reshape(tokens, -1))


# -- the patch embedding: Conv3d (stride = kernel) over flattened patches as one GEMM ---------------------------------

def _plain_conv3d(conv) -> bool:
    return (type(conv) is nn.Conv3d and conv.stride == conv.kernel_size and conv.kernel_size[1] == conv.kernel_size[2]
            and conv.padding in ((0, 0, 0), "valid") and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and plain_forward(conv))


def _embed_forward(self, hidden_states, *args, **kwargs):
    report, backend = self.__dict__[_STATE]
    conv = self.proj
    if args or kwargs or not isinstance(hidden_states, torch.Tensor):
        return original_forward(self)(hidden_states, *args, **kwargs)
    if not _plain_conv3d(conv):
        report.fallback(f"{type(self).__name__}: proj is not a plain Conv3d with stride = kernel any more")
        return original_forward(self)(hidden_states)
    d, c, t, p, _ = conv.weight.shape
    if hidden_states.numel() % (c * t * p * p):
        return original_forward(self)(hidden_states)  # the model raises its own error
    with materialized(conv):  # accelerate: an offloaded weight, loaded around our read (its hook)
        dtype = conv.weight.dtype
        compute = dtype
        device = hidden_states.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and dtype in (torch.float32, torch.float64):
            compute = torch.get_autocast_dtype(device)  # what Conv3d would run in
        weight = conv.weight.to(compute).reshape(d, c * t, p, p)
        bias = None if conv.bias is None else conv.bias.to(compute)
    patches = hidden_states.to(compute).reshape(-1, c * t, p, p)  # N one-patch images of C*T channels
    # In the compute dtype, as the Conv3d's output is (under autocast too): nothing is added after it here.
    return patch_embed(patches, weight, bias, backend=op_backend(backend, "patch_embed")).reshape(-1, d)


# -- patching ------------------------------------------------------------------------------------------------------

def patch_packed_towers(model: nn.Module, report: PatchReport, *, attention: bool, patch_embed: bool,
                        backend=None) -> None:
    """Swap the forwards of the Qwen-VL vision towers' modules in ``model`` (see the module docstring)."""
    used = {type(m).__module__ for m in model.modules()}
    families = [(name, spec) for name, spec in PACKED_TOWERS.items() if name in used]
    if not families:
        return
    towers, attn, embed = {}, {}, {}
    for module_name, (tower_names, attn_names, embed_names) in families:
        if attention:
            attn.update(family_classes(module_name, attn_names, report, "attention"))
            towers.update(family_classes(module_name, tower_names, report, "attention"))
        if patch_embed:
            embed.update(family_classes(module_name, embed_names, report, "patch_embed"))
    if towers and _vision_utils() is None:
        report.skip("", "attention", "transformers.vision_utils does not exist in this transformers version: each "
                    "attention call reads its cu_seqlens once (one host sync per layer)")
        towers = {}
    for path, module in model.named_modules():
        name = type(module).__name__
        if towers.get(name) is type(module):
            if swap_forward(module, _tower_forward, "attention", state=(_STATE, (report, backend))):
                report.add(path, "tower", module, _TOWER_DETAIL)
        elif attn.get(name) is type(module):
            if not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "head_dim", "scaling")):
                report.skip(path, "attention", f"{name} has no qkv/proj/num_heads/head_dim/scaling in this "
                            "transformers version")
                continue
            if swap_forward(module, _attention_forward, "attention", state=(_STATE, (report, backend))):
                report.add(path, "attention", module, _ATTENTION_DETAIL)
                report.add(path, "rotary", module, _ROTARY_DETAIL)
        elif embed.get(name) is type(module):
            if not _plain_conv3d(getattr(module, "proj", None)):
                report.skip(path, "patch_embed", f"{name}.proj is not a plain Conv3d with stride = kernel")
                continue
            if swap_forward(module, _embed_forward, "patch_embed", state=(_STATE, (report, backend))):
                report.add(path, "patch_embed", module, _EMBED_DETAIL)
