"""``attention``: our fused attention against what a user would otherwise call, forward, backward and both.

Providers (each only where it runs on the device and dtype):
- ``mmkernels[triton]`` (and ``mmkernels[reference]`` on CPU, where auto picks it, or when asked for with
  ``--backends reference``);
- ``sdpa-flash`` / ``sdpa-efficient``: PyTorch SDPA with that backend pinned (``torch.nn.attention.sdpa_kernel``);
  ``sdpa-math`` on CPU;
- ``torch.compile(reference)``: our reference under Inductor (CUDA only; skipped where its ``[B, H, Lq, Lk]`` score
  matrix would not fit comfortably);
- ``flash_attn`` when the package is installed.

Baseline: ``sdpa-flash`` on CUDA for fp16/bf16, ``sdpa-efficient`` for fp32, ``sdpa-math`` on CPU.

FLOPs (flash-attn's accounting): forward ``4 B H Lq Lk D``, halved when causal with ``Lq = Lk``; backward 2.5x the
forward; fwd+bwd 3.5x. Bytes: q, k, v read and o written (forward); q, k, v, o, dO read and dq, dk, dv written
(backward). In ``bwd`` mode each provider's forward runs once per input set, outside the timed calls.

Varlen rows (names start with ``varlen``): a batch of images of one vision length packed as ``[total, H, D]`` with
``cu_seqlens`` (and ``max_seqlen_*`` given, as flash-attn requires: the op then takes no host sync; ``cu_seqlens``
values are checked only under ``MMKERNELS_DEBUG_CHECKS=1``). Ours: ``attention(..., cu_seqlens_q=, cu_seqlens_k=)``;
on Triton twice: ``mmkernels[triton]`` with ``MMKERNELS_ATTENTION_PACKED`` as the caller left it (unset: the
``packed_pays`` rule) and ``mmkernels[triton] packed=0`` pinned to the per-sequence kernels (set for its forward
and, by hooks on its output's autograd node, its backward; restored after each). Baselines: SDPA on the dense batch
``[B, H, L, D]`` (the packed tensor viewed as such: one length, so no padding; the output reshaped back to
``[total, H, D]``), the same backend rule as above; ``flash_attn_varlen_func`` when flash_attn is installed (fp16/bf16
on CUDA). FLOPs count valid scores only: ``4 H D sum_i L_i^2``; bytes: q, k, v read, o written, and the two
``cu_seqlens``.

Presets: ``quick`` (tiny, CPU-friendly), ``default`` (the standard sweep, the vision shapes and the varlen ones),
``sweep`` (B*S = 16k tokens, S = 512..16k, H*D = 2048, D in {64, 128}, causal and not), ``vision`` (ViT-B/16 at 224,
ViT-L/14 at 336, ViT-g/14 at 224, batch 256, and the varlen rows), ``varlen`` (256 images of 197 tokens at D = 64,
257 at D = 64 and 88, 577 at D = 72, 1025 at D = 80); ``mla`` (multi-head latent attention, ``D_qk = 192`` /
``D_v = 128``, 128 heads, causal, B*S = 16k tokens at S in {2k, 4k, 8k}: ours unpadded, ours and SDPA-flash with
q/k/v padded to 256, SDPA memory-efficient as the baseline; FLOPs ``2 B H S^2 (D_qk + D_v)``, halved for causal, as
FA3 and cuDNN count; a tiny row in ``quick``, the three in ``default``); ``gpu`` (the GPU suite's budget: vision
plus S in {1k, 4k, 16k}, and the varlen rows).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...kernels.reference.attention import attention_reference
from ...ops.attention import attention
from ..suite import BenchConfig, Inputs, Shape, Suite, has_module, mmkernels_providers, register_suite

# (label, B, Lq, Lk, Hq, Hkv, D, causal)
_QUICK = [
    ("tiny", 2, 128, 128, 4, 4, 64, False),
    ("tiny causal gqa", 1, 256, 256, 4, 2, 64, True),
    ("tiny ViT d72", 2, 197, 197, 2, 2, 72, False),
]
_SWEEP = [
    (f"sweep S={s}", 16384 // s, s, s, 2048 // d, 2048 // d, d, causal)
    for d in (64, 128)
    for causal in (False, True)
    for s in (512, 1024, 2048, 4096, 8192, 16384)
]
_VISION = [
    ("ViT-B/16 224", 256, 197, 197, 12, 12, 64, False),
    ("ViT-L/14 336", 256, 577, 577, 16, 16, 64, False),
    ("ViT-g/14 224", 256, 257, 257, 16, 16, 88, False),
]
# The GPU suite's budget (8 minutes for everything): the vision shapes and a third of the sweep.
_GPU = _VISION + [c for c in _SWEEP if c[1] * c[2] == 16384 and c[2] in (1024, 4096, 16384)]
SHAPES = {"quick": _QUICK, "default": _SWEEP + _VISION, "sweep": _SWEEP, "vision": _VISION, "gpu": _GPU,
          "varlen": [], "mla": []}

# Varlen: (label, images, tokens per image, heads, head dim), full attention, images packed as [B * L, H, D].
_VARLEN = [
    ("varlen ViT-B/16 224", 256, 197, 12, 64),
    ("varlen CLIP ViT-L/14 224", 256, 257, 16, 64),
    ("varlen ViT-g/14 224", 256, 257, 16, 88),
    ("varlen L=577 d72", 256, 577, 16, 72),  # ViT-L/14 at 336's length with SigLIP-so400m's head dim
    ("varlen ViT-H/14 448", 256, 1025, 16, 80),
]
VARLEN_SHAPES = {"quick": [("varlen tiny d72", 3, 65, 2, 72)], "default": _VARLEN, "sweep": [], "vision": _VARLEN,
                 "gpu": _VARLEN, "varlen": _VARLEN, "mla": []}
PACKED_ENV = "MMKERNELS_ATTENTION_PACKED"


def _sdpa(backend_name: str | None):
    def run(q, k, v, causal, scale=None):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views, no copies
        gqa = {"enable_gqa": True} if qt.shape[1] != kt.shape[1] else {}
        if backend_name is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, **gqa)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, backend_name)]):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, **gqa)
        return out.transpose(1, 2)

    return run


# providers that hold the [B, H, Lq, Lk] score matrix (skipped where it would not fit comfortably)
_MATERIALIZING = ("mmkernels[reference]", "torch.compile(reference)", "sdpa-math")


def _compiled_reference():
    return torch.compile(lambda q, k, v, causal: attention_reference(q, k, v, causal=causal))


def _backend_limits(backend: str, config: BenchConfig) -> str | None:
    if backend == "triton" and config.device.type == "cpu" and config.dtype == torch.bfloat16:
        return "the Triton interpreter mishandles bf16 on CPU (use --dtype fp32 or fp16)"
    return None


def _inputs(b, lq, lk, hq, hkv, d, device, dtype, grad, d_v=None) -> Inputs:
    """q, k ``[B, L, H, d]``, v ``[B, Lk, Hkv, d_v]`` (``d_v`` defaults to ``d``); the output is v-wide."""
    q, k, v = (torch.randn(b, n, h, width, device=device, dtype=dtype).requires_grad_(grad)
               for n, h, width in ((lq, hq, d), (lk, hkv, d), (lk, hkv, d if d_v is None else d_v)))
    grad_out = torch.randn(b, lq, hq, v.shape[-1], device=device, dtype=dtype) if grad else None
    return Inputs((q, k, v), wrt=(q, k, v), grad_out=grad_out)


def _varlen_inputs(b, length, h, d, device, dtype, grad) -> Inputs:
    q, k, v = (torch.randn(b * length, h, d, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3))
    cu = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=device)
    return Inputs((q, k, v, cu, cu, length, length), wrt=(q, k, v), grad_out=torch.randn_like(q) if grad else None)


def _varlen_sdpa(backend_name: str | None):
    dense = _sdpa(backend_name)

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        # one length per batch: the packed rows are the dense [B, L, H, D] batch, no padding, no copy
        b = cu_q.numel() - 1
        out = dense(q.view(b, max_q, *q.shape[1:]), k.view(b, max_k, *k.shape[1:]), v.view(b, max_k, *v.shape[1:]),
                    causal)
        return out.reshape(q.shape)

    return run


@contextlib.contextmanager
def _packed_env(value: str):
    old = os.environ.get(PACKED_ENV)
    os.environ[PACKED_ENV] = value
    try:
        yield
    finally:
        _restore_env(old)


def _restore_env(old: str | None) -> None:
    if old is None:
        os.environ.pop(PACKED_ENV, None)
    else:
        os.environ[PACKED_ENV] = old


def _pin_packed(fn, value: str):
    """``fn`` (our varlen attention) with ``MMKERNELS_ATTENTION_PACKED=value`` for its forward and for its output's
    backward (hooks on the attention node: the launchers read the variable in each pass); restored after each."""
    pending: list = []  # the caller's value while a backward runs; left there only if that backward raised

    def run(*args, **kwargs):
        while pending:
            _restore_env(pending.pop())
        with _packed_env(value):
            out = fn(*args, **kwargs)
        node = out.grad_fn
        if node is not None:
            if "attention" not in type(node).__name__:
                raise RuntimeError(f"{PACKED_ENV}={value} row: expected the attention node on the output, got "
                                   f"{type(node).__name__}")

            def enter(grad_outputs):
                pending.append(os.environ.get(PACKED_ENV))
                os.environ[PACKED_ENV] = value

            def leave(grad_inputs, grad_outputs):
                _restore_env(pending.pop())

            node.register_prehook(enter)
            node.register_hook(leave)
        return out

    return run


def _varlen_shapes(config: BenchConfig, ours: list[str], memory_budget: float) -> list[Shape]:
    device, dtype = config.device, config.dtype
    cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)

    def ours_varlen(backend):
        def run(q, k, v, cu_q, cu_k, max_q, max_k, causal):
            return attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                             max_seqlen_k=max_k, backend=backend)
        return run

    candidates = mmkernels_providers(ours, ours_varlen)
    if "triton" in ours:  # what packing buys: the same call pinned to the per-sequence kernels
        candidates["mmkernels[triton] packed=0"] = _pin_packed(ours_varlen("triton"), "0")
    if cuda:
        baseline = "sdpa-flash" if half else "sdpa-efficient"
        candidates[baseline] = _varlen_sdpa("FLASH_ATTENTION" if half else "EFFICIENT_ATTENTION")
        if half and has_module("flash_attn"):
            from flash_attn import flash_attn_varlen_func

            candidates["flash_attn"] = lambda q, k, v, cu_q, cu_k, max_q, max_k, causal: flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
    else:
        baseline = "sdpa-math"
        candidates[baseline] = _varlen_sdpa(None)

    shapes = []
    for label, b, length, h, d in VARLEN_SHAPES[config.preset]:
        scores = b * length * length  # valid score entries per head: sum over images of L_i^2

        def skip(name, mode, h=h, scores=scores):
            need = 4.0 * h * scores * (2 if mode == "fwd" else 4) * (4 if mode == "bwd" else 1)
            return name in _MATERIALIZING and need > memory_budget

        total = b * length
        shapes.append(Shape(
            name=f"{label} B={b} L={length} H={h} D={d}",
            make_inputs=functools.partial(_varlen_inputs, b, length, h, d, device, dtype),
            providers={name: functools.partial(fn, causal=False) for name, fn in candidates.items()},
            baseline=baseline,
            flops=4.0 * h * scores * d,
            # q, k, v read and o written, [total, H, D] each; cu_seqlens_q and _k read (int32 [B + 1])
            bytes=torch.finfo(dtype).bits // 8 * 4 * total * h * d + 2 * 4 * (b + 1),
            params={"B": b, "Lq": length, "Lk": length, "Hq": h, "Hkv": h, "D": d, "causal": False, "varlen": True},
            probe=functools.partial(_varlen_inputs, 2, 16, h, d, device, dtype),
            probe_key=("varlen", d, h),
            skip=skip,
        ))
    return shapes


def _shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device, dtype = config.device, config.dtype
    cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    candidates = mmkernels_providers(
        ours, lambda backend: lambda q, k, v, causal: attention(q, k, v, causal=causal, backend=backend))
    if cuda:
        if half:
            candidates["sdpa-flash"] = _sdpa("FLASH_ATTENTION")
        candidates["sdpa-efficient"] = _sdpa("EFFICIENT_ATTENTION")
        candidates["torch.compile(reference)"] = _compiled_reference()
        if half and has_module("flash_attn"):
            from flash_attn import flash_attn_func

            candidates["flash_attn"] = lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)
        baseline = "sdpa-flash" if half else "sdpa-efficient"
    else:
        candidates["sdpa-math"] = _sdpa(None)
        baseline = "sdpa-math"
    memory_budget = 0.4 * torch.cuda.get_device_properties(device).total_memory if cuda else 4.0 * 2**30

    shapes = []
    for label, b, lq, lk, hq, hkv, d, causal in SHAPES[config.preset]:
        def skip(name, mode, b=b, lq=lq, lk=lk, hq=hq):
            # fp32 scores, probabilities and their gradients; bwd mode keeps one graph per pooled input
            need = 4.0 * b * hq * lq * lk * (2 if mode == "fwd" else 4) * (4 if mode == "bwd" else 1)
            return name in _MATERIALIZING and need > memory_budget

        fwd_flops = 4.0 * b * hq * lq * lk * d / (2 if causal and lq == lk else 1)
        shapes.append(Shape(
            name=f"{label} B={b} Lq={lq} Lk={lk} H={hq}/{hkv} D={d}{' causal' if causal else ''}",
            make_inputs=functools.partial(_inputs, b, lq, lk, hq, hkv, d, device, dtype),
            providers={name: functools.partial(fn, causal=causal) for name, fn in candidates.items()},
            baseline=baseline,
            flops=fwd_flops,
            bytes=torch.finfo(dtype).bits // 8 * b * d * (2 * lq * hq + 2 * lk * hkv),
            params={"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hkv": hkv, "D": d, "causal": causal},
            probe=functools.partial(_inputs, 1, 16, 16, hq, hkv, d, device, dtype),
            probe_key=(d, hq, hkv, causal),
            skip=skip,
        ))
    return shapes + _varlen_shapes(config, ours, memory_budget) + _mla_shapes(config, ours, memory_budget)


# ---- multi-head latent attention: query/key head dim != value head dim ----------------------------------------

# (label, B, L, H, D_qk, D_v), causal self-attention. DeepSeek-V3 / LongCat-Flash widths: 128 + 64 = 192 / 128.
_MLA = [(f"MLA S={s}", 16384 // s, s, 128, 192, 128) for s in (2048, 4096, 8192)]
MLA_SHAPES = {"quick": [("tiny MLA", 1, 128, 2, 192, 128)], "default": _MLA, "sweep": [], "vision": [], "gpu": [],
              "varlen": [], "mla": _MLA}


def _padded(fn, width: int):
    """``fn`` run on q, k and v zero-padded to one head dim ``width`` (what a kernel that needs one power-of-two
    head dim does: FlexAttention, the Triton tutorial, FA2 with V padded), the output cut back to V's dim; the
    softmax scale stays the unpadded ``D_qk ** -0.5``."""
    def run(q, k, v, causal):
        scale = q.shape[-1] ** -0.5
        pad = [F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v)]
        return fn(*pad, causal=causal, scale=scale)[..., : v.shape[-1]]
    return run


def _mla_shapes(config: BenchConfig, ours: list[str], memory_budget: float) -> list[Shape]:
    """Rows with ``D_qk != D_v``. Ours takes the two widths as they are (one call, nothing padded); the padded
    providers pad q, k and v to one width; SDPA's flash backend cannot take 192 / 128 (it needs one head dim), so
    the CUDA baseline is SDPA's memory-efficient backend, which can. FLOPs as FA3 and cuDNN count them:
    ``2 B H Sq Sk (D_qk + D_v)``, halved for causal."""
    device, dtype = config.device, config.dtype
    cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)

    def ours_scaled(backend):
        return lambda q, k, v, causal, scale=None: attention(q, k, v, causal=causal, softmax_scale=scale,
                                                             backend=backend)

    candidates = mmkernels_providers(ours, ours_scaled)
    for b in ours:
        label = "mmkernels" if b is None else f"mmkernels[{b}]"
        candidates[f"{label} padded-256"] = _padded(ours_scaled(b), 256)

    if cuda:
        baseline = "sdpa-efficient"
        candidates[baseline] = _sdpa("EFFICIENT_ATTENTION")
        if half:
            candidates["sdpa-flash padded-256"] = _padded(_sdpa("FLASH_ATTENTION"), 256)
    else:
        baseline = "sdpa-math"
        candidates[baseline] = _sdpa(None)

    shapes = []
    for label, b, length, h, d_qk, d_v in MLA_SHAPES[config.preset]:
        def skip(name, mode, b=b, length=length, h=h):
            need = 4.0 * b * h * length * length * (2 if mode == "fwd" else 4) * (4 if mode == "bwd" else 1)
            return name in _MATERIALIZING and need > memory_budget

        shapes.append(Shape(
            name=f"{label} B={b} L={length} H={h} D={d_qk}/{d_v} causal",
            make_inputs=functools.partial(_inputs, b, length, length, h, h, d_qk, device, dtype, d_v=d_v),
            providers={name: functools.partial(fn, causal=True) for name, fn in candidates.items()},
            baseline=baseline,
            flops=2.0 * b * h * length * length * (d_qk + d_v) / 2,
            bytes=torch.finfo(dtype).bits // 8 * b * length * h * (2 * d_qk + 2 * d_v),
            params={"B": b, "Lq": length, "Lk": length, "Hq": h, "Hkv": h, "D": d_qk, "Dv": d_v, "causal": True},
            probe=functools.partial(_inputs, 1, 16, 16, h, h, d_qk, device, dtype, d_v=d_v),
            probe_key=("mla", d_qk, d_v, h),
            skip=skip,
        ))
    return shapes



# ---- tune cases: the representative problems `mmkernels-bench tune` sweeps for this family's kernels ----------

_TUNE_DTYPES = (torch.bfloat16, torch.float16)


def _attention_cases(atomic: bool | None = None) -> Callable[[], list[dict]]:
    def make() -> list[dict]:
        from ...kernels.triton import attention as _attention  # only with triton, only when tuning

        out = []
        # ViT-B/16 at 224 (197 tokens), an LLM layer (causal, 4096), CLIP-L/336 (577), ViT at 448 (1025, d 80)
        for dtype in _TUNE_DTYPES:
            for d, causal, length in ((64, False, 197), (128, True, 4096), (64, False, 577), (80, False, 1025)):
                shape = {"dtype": dtype, "head_dim": d, "block_d": _attention._block_d(d), "causal": causal,
                         "lq": length, "lk": length}
                if atomic is not None:
                    shape["atomic"] = atomic
                out.append(shape)
        return out

    return make


register_suite(Suite(
    name="attention",
    description="fused attention (FlashAttention-2 style Triton), dense and packed varlen, vs SDPA, flash-attn, "
                "compiled reference",
    shapes=_shapes,
    presets=("quick", "default", "sweep", "vision", "gpu", "varlen", "mla"),
    default_dtype=torch.bfloat16,
    ops=("attention",),
    modes=("fwd", "bwd", "fwd+bwd"),
    bwd_flop_factor=2.5,
    backend_limits=_backend_limits,
    tune_cases={"attention_fwd": _attention_cases(), "attention_bwd_dkdv": _attention_cases(atomic=True),
                "attention_bwd_dq": _attention_cases()},
))
