"""Q-Former benchmarks.

``qformer_cross_attention``: the op (32 learned queries, 12 heads of 64, over Lk image tokens) against what a user
would otherwise run, on the same ``[B, L, H, D]`` inputs: SDPA with the flash and the memory-efficient backends
pinned (CUDA; plain SDPA dispatch on CPU), FlexAttention compiled (CUDA, when it compiles here), and HF's eager
attention (matmul, fp32 softmax, matmul). TFLOP/s from the general count ``4 * B * H * Lq * Lk * D`` (backward
2.5x the forward). Modes ``fwd`` and ``fwd+bwd``.

``qformer``: the whole Q-Former (BLIP-2 config; the quick preset a tiny one) — our :class:`mmkernels.models.QFormer`
against HF ``Blip2QFormerModel`` with eager and with SDPA attention, same weights, same dtype. Queries/s is
``batch * 32 / median`` (rows' ``params`` carry the batch and query count). Without ``transformers`` the HF providers
are skipped and the speed-up column is relative to ours.

:func:`flop_split_table` gives the analytic FLOP split of the real Q-Former (docs/models/qformer.md quotes it):
``python -c "from mmkernels.bench.suites.qformer import flop_split_table; print(flop_split_table())"``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...ops.qformer_attention import qformer_cross_attention
from ..suite import BenchConfig, Inputs, Shape, Suite, has_module, mmkernels_providers, register_suite

LQ, H, D = 32, 12, 64
# (B, Lk) grids; the quick preset runs on CPUs in seconds.
ATTN_SHAPES = {
    "quick": [(2, 65, 2), (1, 257, 12)],  # (B, Lk, H)
    "default": [(b, lk, H) for b in (1, 32, 256) for lk in (257, 577, 677)],
}


def hf_eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """HF ``eager_attention_forward`` on ``[B, L, H, D]`` tensors: matmul, softmax in fp32, matmul."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2)


def _sdpa(q, k, v, scale, kernel=None):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([kernel]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_attention(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return _flex()(q, k, v, scale=scale).transpose(1, 2)


def _attn_inputs(B, Lk, heads, device, dtype, grad) -> Inputs:
    q, k, v = (torch.randn(B, n, heads, D, device=device, dtype=dtype, requires_grad=grad) for n in (LQ, Lk, Lk))
    return Inputs((q, k, v), wrt=(q, k, v), grad_out=torch.randn_like(q) if grad else None)


def _attention_shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device, dtype = config.device, config.dtype
    scale = D**-0.5
    baselines: dict[str, object] = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        baselines["sdpa[flash]"] = functools.partial(_sdpa, kernel=SDPBackend.FLASH_ATTENTION)
        baselines["sdpa[efficient]"] = functools.partial(_sdpa, kernel=SDPBackend.EFFICIENT_ATTENTION)
        if config.preset != "quick" and has_module("torch.nn.attention.flex_attention"):
            baselines["flex_attention[compiled]"] = _flex_attention
        baseline = "sdpa[efficient]" if dtype == torch.float32 else "sdpa[flash]"  # flash has no fp32 kernel
    else:
        baselines["sdpa"] = _sdpa
        baseline = "sdpa"
    baselines["hf-eager"] = hf_eager_attention
    shapes = []
    for B, Lk, heads in ATTN_SHAPES[config.preset]:
        providers = mmkernels_providers(ours, lambda b: lambda q, k, v: qformer_cross_attention(q, k, v, backend=b))
        for name, fn in baselines.items():
            providers[name] = lambda q, k, v, fn=fn: fn(q, k, v, scale)
        shapes.append(Shape(
            name=f"B={B} Lq={LQ} Lk={Lk} H={heads} D={D}",
            make_inputs=functools.partial(_attn_inputs, B, Lk, heads, device, dtype),
            providers=providers,
            baseline=baseline,
            flops=4.0 * B * heads * LQ * Lk * D,
            bytes=float(torch.finfo(dtype).bits // 8 * B * heads * D * (2 * LQ + 2 * Lk)),  # q, k, v read; out written
            params={"B": B, "Lq": LQ, "Lk": Lk, "H": heads, "D": D},
            # the suite's shape class (32 queries, a key count not a multiple of 128) on one batch and two heads,
            # tried once per run: a compiled baseline compiles on each new probe shape
            probe=functools.partial(_attn_inputs, 1, 257, 2, device, dtype),
            probe_key="Lq=32 Lk=257",
        ))
    return shapes


# ---- tune cases: the representative problems `mmkernels-bench tune` sweeps for this family's kernels ----------

_TUNE_DTYPES = (torch.bfloat16, torch.float16)


def _qformer_cases() -> list[dict]:
    from ...kernels.triton import qformer_attention as _qformer  # only with triton, only when tuning

    out = []
    for dtype in _TUNE_DTYPES:
        for lq, lk, d in ((32, 257, 64), (32, 677, 88)):  # BLIP-2 over ViT-L/14 and ViT-g/14 tokens
            bm, bd = _qformer._blocks(lq, d)
            out.append({"dtype": dtype, "lq": lq, "head_dim": d, "block_m": bm, "block_d": bd, "lk": lk})
    return out


register_suite(Suite(
    name="qformer_cross_attention",
    description="Q-Former cross-attention (32 queries over image tokens) vs SDPA flash/efficient, Flex, HF eager",
    shapes=_attention_shapes,
    default_dtype=torch.bfloat16,
    cpu_dtype=torch.float32,
    ops=("qformer_cross_attention",),
    modes=("fwd", "fwd+bwd"),
    bwd_flop_factor=2.5,
    tune_cases={"qformer_fwd": _qformer_cases, "qformer_bwd": _qformer_cases},
))


# --------------------------------------------------------------------------------------------------------------
# the whole Q-Former
# --------------------------------------------------------------------------------------------------------------

MODEL_SHAPES = {
    "quick": [("tiny", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            encoder_hidden_size=48), 2, 33)],
    "default": [("BLIP-2", {}, 256, 257)],  # the real config at 224 px: 257 ViT-g tokens
}
OURS, HF_EAGER, HF_SDPA = "mmkernels QFormer", "HF Blip2QFormerModel (eager)", "HF Blip2QFormerModel (sdpa)"


@functools.cache
def _hf_models(fields: tuple, device: torch.device, dtype: torch.dtype) -> dict:
    """HF Q-Formers with eager and SDPA attention, same weights; {} without transformers. Built on first use (the
    real config takes a while to initialise)."""
    if not has_module("transformers"):
        return {}
    import transformers

    hf = {}
    for impl, name in (("eager", HF_EAGER), ("sdpa", HF_SDPA)):
        cfg = transformers.Blip2QFormerConfig(**dict(fields), attn_implementation=impl)
        torch.manual_seed(0)
        hf[name] = transformers.Blip2QFormerModel(cfg).to(device=device, dtype=dtype).eval()
    return hf


@functools.cache
def _our_model(fields: tuple, device: torch.device, dtype: torch.dtype, backend: str | None):
    """Ours, with the HF models' weights when transformers is installed."""
    from ...models.qformer import QFormer, QFormerConfig

    hf = _hf_models(fields, device, dtype)
    if hf:
        return QFormer.from_hf(hf[HF_SDPA], backend=backend).eval()
    return QFormer(QFormerConfig(**dict(fields)), backend=backend, device=device, dtype=dtype).eval()


@functools.cache
def _param_count(fields: tuple) -> int:
    """Our Q-Former's parameter count (BLIP-2: 105,137,664), counted on the meta device (no memory, no init)."""
    from ...models.qformer import QFormer, QFormerConfig

    return sum(p.numel() for p in QFormer(QFormerConfig(**dict(fields)), device="meta").parameters())


def _model_shapes(config: BenchConfig, ours: list) -> list[Shape]:
    from ...models.qformer import QFormerConfig, qformer_flops

    device, dtype = config.device, config.dtype
    have_hf = has_module("transformers")
    shapes = []
    for label, fields, batch, lk in MODEL_SHAPES[config.preset]:
        key = tuple(sorted(fields.items()))
        qcfg = QFormerConfig(**fields)

        def make_inputs(grad, batch=batch, lk=lk, qcfg=qcfg):
            q = torch.randn(batch, LQ, qcfg.hidden_size, device=device, dtype=dtype, requires_grad=grad)
            img = torch.randn(batch, lk, qcfg.encoder_hidden_size, device=device, dtype=dtype)
            return Inputs((q, img), grad_out=torch.randn(batch, LQ, qcfg.hidden_size, device=device, dtype=dtype))

        providers = mmkernels_providers(ours, lambda b, key=key: lambda q, img: _our_model(key, device, dtype, b)(
            q, img), label=OURS)
        for name in (HF_EAGER, HF_SDPA) if have_hf else ():
            providers[name] = lambda q, img, key=key, name=name: _hf_models(key, device, dtype)[name](
                query_embeds=q, encoder_hidden_states=img).last_hidden_state
        # Bytes, each tensor once: forward reads every parameter, the queries [B, 32, D] and the image features
        # [B, Lk, E] and writes [B, 32, D]; the backward reads the output gradient, the parameters and the image
        # features (the K/V projections' weight gradient) and writes the parameters' and the queries' gradients.
        elem = torch.finfo(dtype).bits // 8
        queries, image = batch * LQ * qcfg.hidden_size, batch * lk * qcfg.encoder_hidden_size
        weights = _param_count(key)
        shapes.append(Shape(
            name=f"{label} B={batch} Lq={LQ} Lk={lk}",
            make_inputs=make_inputs,
            providers=providers,
            baseline=HF_SDPA if have_hf else next(iter(providers)),
            flops=qformer_flops(qcfg, num_queries=LQ, image_tokens=lk, batch=batch)["total"],
            bytes=float(elem * (weights + 2 * queries + image)),
            bwd_bytes=float(elem * (2 * weights + 2 * queries + image)),
            params={"batch": batch, "queries": batch * LQ, "Lk": lk, **fields},
        ))
    return shapes


register_suite(Suite(
    name="qformer",
    description="whole Q-Former queries/s (batch*32 / median): mmkernels QFormer vs HF Blip2QFormerModel eager/SDPA",
    shapes=_model_shapes,
    default_dtype=torch.bfloat16,
    cpu_dtype=torch.float32,
    ops=("qformer_cross_attention", "attention"),
    modes=("fwd", "fwd+bwd"),
    model=True,
))


def flop_split_table(image_tokens: tuple[int, ...] = (257, 677)) -> str:
    """Markdown table of the real Q-Former's forward FLOPs per sample, by part (analytic)."""
    from ...models.qformer import PRESETS, qformer_flops

    parts = ("cross_kv_proj", "ffn", "self_attn_proj", "cross_q_out_proj", "attention_math")
    lines = ["| part | " + " | ".join(f"Lk = {n}" for n in image_tokens) + " |",
             "|---|" + "---|" * len(image_tokens)]
    splits = [qformer_flops(PRESETS["blip2"], image_tokens=n) for n in image_tokens]
    for p in parts + ("total",):
        cells = []
        for s in splits:
            share = f" ({100 * s[p + '_share']:.1f}%)" if p != "total" else ""
            cells.append(f"{s[p] / 1e9:.3f} GFLOP{share}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

