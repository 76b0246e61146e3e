"""``moe_route`` and ``moe_experts``: LongCat-Flash routing and grouped SwiGLU experts against what users run today.

moe_route providers: ``mmkernels[cuda|cpp|reference]``; ``torch-eager`` (softmax + bias + topk + gather +
bincount, as HF's router does it, plus the zero-expert weight); ``torch-compile`` of the same (CUDA only).
Baseline: ``torch-eager``. Bytes: logits read once, ids/weights/zero_weight/counts written once.

moe_experts providers: ``mmkernels[triton]``; ``mmkernels-split[<backend>]`` (the same FFN as the three pieces the
expert-parallel path runs: ``moe_permute`` -> ``moe_grouped_swiglu`` -> ``moe_unpermute``, one backend for all
three, when that backend has all three); ``torch-loop`` (sort by expert, one GEMM pair per expert: our
reference, which syncs to the host for the loop); ``torch-grouped-mm`` (``torch._grouped_mm`` over a sorted,
gathered copy of the activations, where the installed torch has it for this device and dtype); ``hf-loop`` (HF
``LongcatFlashExperts``, when transformers is installed, fwd only). Baseline: ``torch-loop``. FLOPs count FFN
slots only: ``6 Dm Di`` per slot forward, 3x that for fwd+bwd. Routing skews: uniform, mild (logit std 0.5),
extreme (std 2).

Presets: ``quick`` (tiny, CPU-friendly), ``default`` (the issue's shapes), ``gpu`` (what fits the GPU suite's
budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...kernels.reference.moe import moe_experts_reference
from ...ops.moe import (
    PERMUTE_BACKENDS,
    SWIGLU_BACKENDS,
    UNPERMUTE_BACKENDS,
    MoERouting,
    moe_experts,
    moe_grouped_swiglu,
    moe_permute,
    moe_route,
    moe_unpermute,
)
from ..suite import MICROSECOND, BenchConfig, Inputs, Shape, Suite, has_module, mmkernels_providers, register_suite

# ---- routing -----------------------------------------------------------------------------------------------------

ROUTE_SHAPES = {  # (T, N, Z, K)
    "quick": [(128, 256, 128, 12), (1024, 512, 256, 12)],
    "default": [(t, n, z, 12) for t in (1, 128, 4096, 16384) for n, z in ((256, 128), (512, 256))],
    "gpu": [(t, n, z, 12) for t in (1, 128, 4096, 16384) for n, z in ((256, 128), (512, 256))],
}


def eager_router(logits, bias, k, n, scale):
    """What a PyTorch user writes (HF LongcatFlashTopkRouter + the zero-weight and the counts)."""
    scores = logits.float().softmax(-1)
    ids = torch.topk(scores + bias, k, dim=-1, sorted=False).indices
    w = scores.gather(1, ids) * scale
    zero_weight = (w * (ids >= n)).sum(-1)
    return ids, w, zero_weight, torch.bincount(ids.flatten(), minlength=logits.shape[1])


def _route_shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device = config.device
    compiled = torch.compile(eager_router) if device.type == "cuda" else None
    shapes = []
    for t, n, z, k in ROUTE_SHAPES[config.preset]:
        e = n + z

        def make_inputs(grad, t=t, e=e):
            return Inputs((torch.randn(t, e, device=device), torch.randn(e, device=device) * 1e-3))

        providers = mmkernels_providers(ours, lambda b, n=n, k=k: lambda logits, bias: moe_route(
            logits, top_k=k, num_ffn_experts=n, bias=bias, routed_scaling_factor=6.0, backend=b))
        providers["torch-eager"] = lambda logits, bias, n=n, k=k: eager_router(logits, bias, k, n, 6.0)
        if compiled is not None:
            providers["torch-compile"] = lambda logits, bias, n=n, k=k: compiled(logits, bias, k, n, 6.0)
        # FLOPs, about 5 per logit: the softmax's max, exp, sum and divide, and the bias add. Bytes: fp32 logits
        # [T, N+Z] and bias [N+Z] read; int32 ids and fp32 weights [T, K], fp32 zero_weight [T] and int32 counts
        # [N+Z] written.
        shapes.append(Shape(
            name=f"T={t} N+Z={e} K={k}", make_inputs=make_inputs, providers=providers, baseline="torch-eager",
            flops=float(5 * t * e), bytes=float(4 * t * e + 4 * e + t * k * 8 + 4 * t + 4 * e),
            params={"T": t, "N": n, "Z": z, "K": k},
        ))
    return shapes


register_suite(Suite(
    name="moe_route",
    description="top-k routing with zero-computation experts vs eager/compiled PyTorch routers",
    shapes=_route_shapes,
    presets=("quick", "default", "gpu"),
    ops=("moe_route",),
    tags=(MICROSECOND,),
))

# ---- experts -----------------------------------------------------------------------------------------------------

# (label, T, Dm, N, Z, K, Di)
EXPERT_SHAPES = {
    "quick": [("tiny", 256, 128, 8, 4, 4, 64)],
    "default": [("LongCat-Flash-Lite", 4096, 3072, 256, 128, 12, 1024),
                ("LongCat-Flash (64+32 experts)", 2048, 6144, 64, 32, 12, 2048)],
    "gpu": [("LongCat-Flash-Lite", 4096, 3072, 256, 128, 12, 1024),
            ("LongCat-Flash (64+32 experts)", 2048, 6144, 64, 32, 12, 2048)],
}
SKEWS = {"uniform": 0.0, "mild": 0.5, "extreme": 2.0}


def routing_with_skew(t, n, z, k, skew, device, seed=0) -> MoERouting:
    """Routing of the LongCat router on logits with per-expert offsets ``skew * N(0, 1)`` plus token noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = skew * torch.randn(n + z, generator=g) + torch.randn(t, n + z, generator=g)
    r = moe_route(logits, top_k=k, num_ffn_experts=n, routed_scaling_factor=6.0, backend="reference")
    return MoERouting(*(x.to(device) for x in r))


def torch_loop(hidden, r, w_gate_up, w_down):
    return moe_experts_reference(hidden, r.topk_ids, r.topk_weights, r.zero_weight, w_gate_up, w_down)


def grouped_mm_experts(hidden, r, w_gate_up, w_down):
    """``torch._grouped_mm`` on a sorted, gathered copy of the FFN slots' activations (one host sync)."""
    t, k = r.topk_ids.shape
    n = w_gate_up.shape[0]
    di = w_gate_up.shape[1] // 2
    flat = r.topk_ids.reshape(-1).long()
    slots = torch.nonzero(flat < n).squeeze(1)
    order = slots[torch.argsort(flat[slots], stable=True)]
    offs = torch.bincount(flat[order], minlength=n).cumsum(0).to(torch.int32)
    rows = hidden[order // k]
    gu = torch._grouped_mm(rows, w_gate_up.transpose(1, 2), offs=offs)
    h = F.silu(gu[:, :di]) * gu[:, di:]
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs) * r.topk_weights.reshape(-1)[order, None]
    out = hidden * r.zero_weight[:, None].to(hidden.dtype)
    return out.index_add(0, order // k, y.to(hidden.dtype))


def split_experts(hidden, r, w_gate_up, w_down, *, backend):
    """``moe_experts`` as the expert-parallel path runs it on one rank: permute, grouped SwiGLU, unpermute."""
    rows, plan = moe_permute(hidden, r.topk_ids, num_local_experts=w_gate_up.shape[0], backend=backend)
    out = moe_grouped_swiglu(rows, plan.offsets, w_gate_up, w_down, backend=backend)
    return moe_unpermute(out, plan, r.topk_weights, zero_weight=r.zero_weight, hidden=hidden, backend=backend)


def _split_backends(ours: list[str]) -> list[str]:
    have = [set(b.impls) for b in (PERMUTE_BACKENDS, SWIGLU_BACKENDS, UNPERMUTE_BACKENDS)]
    return [b for b in ours if all(b in h for h in have)]


def _hf_experts(n, z, dm, di, w_gate_up, w_down):
    if not has_module("transformers"):
        return None
    try:
        from transformers.models.longcat_flash.configuration_longcat_flash import LongcatFlashConfig
        from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashExperts
    except ImportError:
        return None
    cfg = LongcatFlashConfig(hidden_size=dm, n_routed_experts=n, zero_expert_num=z, expert_ffn_hidden_size=di)
    with torch.device("meta"):
        experts = LongcatFlashExperts(cfg)
    pad = torch.zeros(z, *w_gate_up.shape[1:], dtype=w_gate_up.dtype, device=w_gate_up.device)
    experts.gate_up_proj = torch.nn.Parameter(torch.cat([w_gate_up, pad]), requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
    return experts


def _expert_shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device, dtype = config.device, config.dtype
    shapes = []
    for label, t, dm, n, z, k, di in EXPERT_SHAPES[config.preset]:
        w_gate_up = (torch.randn(n, 2 * di, dm, device=device) / dm**0.5).to(dtype)
        w_down = (torch.randn(n, dm, di, device=device) / di**0.5).to(dtype)
        probe_routing = routing_with_skew(8, n, z, k, 0.0, device)
        hf = _hf_experts(n, z, dm, di, w_gate_up, w_down)
        for skew_name, skew in SKEWS.items():
            r = routing_with_skew(t, n, z, k, skew, device)
            ffn_slots = int((r.topk_ids < n).sum())

            def make_inputs(grad, t=t, dm=dm, r=r, w_gate_up=w_gate_up, w_down=w_down):
                x = torch.randn(t, dm, device=device, dtype=dtype, requires_grad=grad)
                w1, w2 = w_gate_up.detach().requires_grad_(grad), w_down.detach().requires_grad_(grad)
                return Inputs((x, r, w1, w2), wrt=(x, w1, w2), grad_out=torch.randn_like(x) if grad else None)

            def probe(grad, make=make_inputs, r=probe_routing):
                return make(grad, t=8, r=r)

            providers = mmkernels_providers(ours, lambda b: lambda h, routing, w1, w2: moe_experts(
                h, routing, w1, w2, backend=b))
            for b in _split_backends(ours):
                providers[f"mmkernels-split[{b}]"] = lambda h, routing, w1, w2, b=b: split_experts(
                    h, routing, w1, w2, backend=b)
            providers["torch-loop"] = torch_loop
            if hasattr(torch, "_grouped_mm"):
                providers["torch-grouped-mm"] = grouped_mm_experts
            if hf is not None:
                providers["hf-loop"] = lambda h, routing, w1, w2, hf=hf: hf(
                    h, routing.topk_ids.long(), routing.topk_weights)
            weight_bytes = (3 * n * dm * di) * w_gate_up.element_size()
            act_bytes = 2 * t * dm * w_gate_up.element_size()
            shapes.append(Shape(
                name=f"{label} T={t} {skew_name}", make_inputs=make_inputs, providers=providers,
                baseline="torch-loop", flops=6.0 * dm * di * ffn_slots, bytes=float(weight_bytes + act_bytes),
                params={"T": t, "Dm": dm, "N": n, "Z": z, "K": k, "Di": di, "skew": skew, "ffn_slots": ffn_slots},
                probe=probe, probe_key=(label, dm, n, z, k, di),
                skip=lambda name, mode: name == "hf-loop" and mode != "fwd",  # HF's experts hold frozen weights
            ))
    return shapes


# ---- tune cases: the representative problems `mmkernels-bench tune` sweeps for this family's kernels ----------

_TUNE_DTYPES = (torch.bfloat16, torch.float16)


def _moe_cases(wgrad: bool) -> Callable[[], list[dict]]:
    def make() -> list[dict]:
        from ...kernels.triton import moe as _moe  # only with triton, only when tuning

        out = []
        # LongCat-Flash-Lite-like widths (Dm 3072, Di 1024): gate/up (gated) and down projections; 256 and 1024 rows
        # per expert (training batches), 64 (inference)
        for dtype in _TUNE_DTYPES:
            bm = _moe.block_m(dtype)
            for tpe in (256, 1024, 64):
                experts = 8
                tiles = math.ceil(tpe * experts / bm) + experts
                base = {"dtype": dtype, "experts": experts, "tiles": tiles, "block_m": bm}
                if wgrad:
                    out += [dict(base, m=3072, n=1024), dict(base, m=2048, n=3072)]
                else:
                    out += [dict(base, n=1024, k=3072, gated=True), dict(base, n=3072, k=1024, gated=False)]
        return out

    return make


register_suite(Suite(
    name="moe_experts",
    description="grouped SwiGLU experts with zero experts vs per-expert loop, torch._grouped_mm, HF",
    shapes=_expert_shapes,
    presets=("quick", "default", "gpu"),
    default_dtype=torch.bfloat16,
    cpu_dtype=torch.float32,
    ops=("moe_experts",),
    modes=("fwd", "fwd+bwd"),
    reference_is_baseline=True,
    tune_cases={"moe_grouped_gemm": _moe_cases(False), "moe_grouped_wgrad": _moe_cases(True)},
))
