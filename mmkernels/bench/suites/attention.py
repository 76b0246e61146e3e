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

Presets: ``quick`` (tiny, CPU-friendly), ``default`` (the standard sweep and the vision shapes), ``sweep`` (B*S =
16k tokens, S = 512..16k, H*D = 2048, D in {64, 128}, causal and not) and ``vision`` (ViT-B/16 at 224, ViT-L/14 at
336, ViT-g/14 at 224, batch 256); ``gpu`` (the GPU suite's budget: vision plus S in {1k, 4k, 16k}).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from ...kernels.reference.attention import attention_reference
from ...ops.attention import BACKENDS, attention
from ..suite import BenchConfig, Case, Suite, register_suite

MODES = ("fwd", "bwd", "fwd+bwd")
_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

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
SHAPES = {"quick": _QUICK, "default": _SWEEP + _VISION, "sweep": _SWEEP, "vision": _VISION, "gpu": _GPU}


def flops(b: int, lq: int, lk: int, hq: int, d: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * b * hq * lq * lk * d
    if causal and lq == lk:
        fwd /= 2
    return fwd * _FLOP_FACTOR[mode]


def _bytes(b, lq, lk, hq, hkv, d, elem, mode) -> float:
    fwd = elem * b * d * (2 * lq * hq + 2 * lk * hkv)
    bwd = elem * b * d * (4 * lq * hq + 4 * lk * hkv)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _sdpa(backend_name: str | None):
    def run(q, k, v, causal):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views, no copies
        gqa = {"enable_gqa": True} if qt.shape[1] != kt.shape[1] else {}
        if backend_name is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **gqa)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, backend_name)]):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **gqa)
        return out.transpose(1, 2)

    return run


@functools.cache
def _runs(name: str, fn, device: str, dtype: torch.dtype, d: int, hq: int, hkv: int, causal: bool) -> bool:
    """Whether a provider runs for this head dim / dtype / GQA / causal on this device (one tiny trial)."""
    try:
        q = torch.randn(1, 16, hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 16, hkv, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 16, hkv, d, device=device, dtype=dtype, requires_grad=True)
        fn(q, k, v, causal).sum().backward()
        return True
    except Exception:  # noqa: BLE001  (any failure means: not a provider here)
        return False


# providers that hold the [B, H, Lq, Lk] score matrix (skipped where it would not fit comfortably)
_MATERIALIZING = ("mmkernels[reference]", "torch.compile(reference)", "sdpa-math")


def _compiled_reference():
    return torch.compile(lambda q, k, v, causal: attention_reference(q, k, v, causal=causal))


def _wrap(fn, mode: str, causal: bool):
    if mode == "fwd":
        def run(x):
            with torch.no_grad():
                return fn(x["q"], x["k"], x["v"], causal)
    elif mode == "fwd+bwd":
        def run(x):
            out = fn(x["q"], x["k"], x["v"], causal)
            return torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["do"])
    else:
        def run(x):
            out = x["saved"].get(run)
            if out is None:  # first call on these inputs: the forward, outside the timed calls after warm-up
                out = x["saved"][run] = fn(x["q"], x["k"], x["v"], causal)
            return torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["do"], retain_graph=True)
    return run


def _build(config: BenchConfig) -> list[Case]:
    device = config.device
    cuda = device.type == "cuda"
    dtype = config.dtype or torch.bfloat16
    half = dtype in (torch.float16, torch.bfloat16)
    available = BACKENDS.available(device)
    ours = [b for b in available if b != "reference" and (config.backends is None or b in config.backends)]
    if device.type == "cpu" and dtype == torch.bfloat16:
        ours = [b for b in ours if b != "triton"]  # the interpreter mishandles bf16 on CPU
    want_reference = not cuda or (config.backends is not None and "reference" in config.backends)
    if want_reference and (config.backends is None or "reference" in config.backends):
        ours.append("reference")

    candidates = {}
    for backend in ours:
        candidates[f"mmkernels[{backend}]"] = (
            lambda q, k, v, causal, backend=backend: attention(q, k, v, causal=causal, backend=backend))
    if cuda:
        if half:
            candidates["sdpa-flash"] = _sdpa("FLASH_ATTENTION")
        candidates["sdpa-efficient"] = _sdpa("EFFICIENT_ATTENTION")
        candidates["torch.compile(reference)"] = _compiled_reference()
        if half and importlib.util.find_spec("flash_attn") is not None:
            from flash_attn import flash_attn_func

            candidates["flash_attn"] = lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)
        baseline = "sdpa-flash" if half else "sdpa-efficient"
    else:
        candidates["sdpa-math"] = _sdpa(None)
        baseline = "sdpa-math"
    memory_budget = 0.4 * torch.cuda.get_device_properties(device).total_memory if cuda else 4.0 * 2**30

    cases = []
    for label, b, lq, lk, hq, hkv, d, causal in SHAPES[config.preset]:
        for mode in MODES:
            def make_inputs(b=b, lq=lq, lk=lk, hq=hq, hkv=hkv, d=d, mode=mode):
                grad = mode != "fwd"
                return {
                    "q": torch.randn(b, lq, hq, d, device=device, dtype=dtype).requires_grad_(grad),
                    "k": torch.randn(b, lk, hkv, d, device=device, dtype=dtype).requires_grad_(grad),
                    "v": torch.randn(b, lk, hkv, d, device=device, dtype=dtype).requires_grad_(grad),
                    "do": torch.randn(b, lq, hq, d, device=device, dtype=dtype) if grad else None,
                    "saved": {},
                }

            providers = {}
            for name, fn in candidates.items():
                if name in _MATERIALIZING:
                    # fp32 scores, probabilities and their gradients; bwd mode keeps one graph per pooled input
                    need = 4.0 * b * hq * lq * lk * (2 if mode == "fwd" else 4) * (4 if mode == "bwd" else 1)
                    if need > memory_budget:
                        continue
                if not name.startswith("mmkernels") and not _runs(name, fn, str(device), dtype, d, hq, hkv, causal):
                    continue
                providers[name] = _wrap(fn, mode, causal)
            if not providers:
                continue
            elem = torch.finfo(dtype).bits // 8
            cases.append(Case(
                name=f"{label} B={b} Lq={lq} Lk={lk} H={hq}/{hkv} D={d}{' causal' if causal else ''}",
                make_inputs=make_inputs,
                providers=providers,
                baseline=baseline if baseline in providers else next(iter(providers)),
                mode=mode,
                flops=flops(b, lq, lk, hq, d, causal, mode),
                bytes=_bytes(b, lq, lk, hq, hkv, d, elem, mode),
                params={"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hkv": hkv, "D": d, "causal": causal},
            ))
    return cases


register_suite(Suite(
    name="attention",
    description="fused attention (FlashAttention-2 style Triton) vs SDPA flash/efficient, compiled reference",
    build=_build,
    presets=("quick", "default", "sweep", "vision", "gpu"),
    default_dtype=torch.bfloat16,
))
