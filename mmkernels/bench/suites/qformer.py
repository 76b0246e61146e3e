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
import importlib.util

import torch
import torch.nn.functional as F

from ...ops.qformer_attention import BACKENDS, qformer_cross_attention
from ..suite import BenchConfig, Case, Suite, register_suite

LQ, H, D = 32, 12, 64
# (B, Lk) grids; the quick preset runs on CPUs in seconds.
ATTN_SHAPES = {
    "quick": [(2, 65, 2), (1, 257, 12)],  # (B, Lk, H)
    "default": [(b, lk, H) for b in (1, 32, 256) for lk in (257, 577, 677)],
}
MODES = ("fwd", "fwd+bwd")


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
    """Compiled FlexAttention, or None when it is missing or does not compile on this machine (probed once)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention)
        q = torch.randn(1, 2, LQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(1, 2, 257, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fn(q, kv, kv).sum().backward()  # the suite's shape class: 32 queries, a key count not a multiple of 128
        return fn
    except Exception:  # noqa: BLE001 - any failure means: no FlexAttention row
        return None


def _flex_attention(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return _flex()(q, k, v, scale=scale).transpose(1, 2)


def _attn_flops(B: int, Lk: int, heads: int, mode: str) -> float:
    fwd = 4.0 * B * heads * LQ * Lk * D
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _attn_bytes(B: int, Lk: int, heads: int, mode: str, elt: int) -> float:
    fwd = elt * B * heads * D * (2 * LQ + 2 * Lk)  # read q, k, v; write out
    return fwd * (3.0 if mode == "fwd+bwd" else 1.0)  # + read q, k, v, out, dout; write dq, dk, dv


def _build_attention(config: BenchConfig) -> list[Case]:
    device = config.device
    dtype = config.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ours = [b for b in BACKENDS.available(device) if config.backends is None or b in config.backends]
    scale = D**-0.5
    baselines: dict[str, object] = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        baselines["sdpa[flash]"] = functools.partial(_sdpa, kernel=SDPBackend.FLASH_ATTENTION)
        baselines["sdpa[efficient]"] = functools.partial(_sdpa, kernel=SDPBackend.EFFICIENT_ATTENTION)
        if config.preset != "quick" and _flex() is not None:
            baselines["flex_attention[compiled]"] = _flex_attention
    else:
        baselines["sdpa"] = _sdpa
    baselines["hf-eager"] = hf_eager_attention
    cases = []
    for B, Lk, heads in ATTN_SHAPES[config.preset]:
        for mode in MODES:
            train = mode == "fwd+bwd"

            def make_inputs(B=B, Lk=Lk, heads=heads, train=train):
                t = [torch.randn(B, n, heads, D, device=device, dtype=dtype, requires_grad=train)
                     for n in (LQ, Lk, Lk)]
                return (*t, torch.randn(B, LQ, heads, D, device=device, dtype=dtype))

            def wrap(fn, train=train):
                def run(x):
                    q, k, v, dout = x
                    if not train:
                        with torch.no_grad():
                            return fn(q, k, v)
                    out = fn(q, k, v)
                    out.backward(dout)
                    return out
                return run

            providers = {f"mmkernels[{b}]": wrap(lambda q, k, v, b=b: qformer_cross_attention(q, k, v, backend=b))
                         for b in ours}
            for name, fn in baselines.items():
                providers[name] = wrap(lambda q, k, v, fn=fn: fn(q, k, v, scale))
            baseline = "sdpa[flash]" if "sdpa[flash]" in providers else "sdpa"
            if dtype == torch.float32 and device.type == "cuda":  # flash has no fp32 kernel
                providers.pop("sdpa[flash]", None)
                baseline = "sdpa[efficient]"
            cases.append(Case(
                name=f"B={B} Lq={LQ} Lk={Lk} H={heads} D={D}",
                make_inputs=make_inputs,
                providers=providers,
                baseline=baseline,
                mode=mode,
                flops=_attn_flops(B, Lk, heads, mode),
                bytes=_attn_bytes(B, Lk, heads, mode, torch.empty((), dtype=dtype).element_size()),
                params={"B": B, "Lq": LQ, "Lk": Lk, "H": heads, "D": D},
            ))
    return cases


register_suite(Suite(
    name="qformer_cross_attention",
    description="Q-Former cross-attention (32 queries over image tokens) vs SDPA flash/efficient, Flex, HF eager",
    build=_build_attention,
    default_dtype=torch.bfloat16,
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


def _has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _build_model(config: BenchConfig) -> list[Case]:
    from ...models.qformer import QFormer, QFormerConfig, qformer_flops

    device = config.device
    dtype = config.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    have_hf = _has_transformers()
    backend = None if config.backends is None else next(
        (b for b in config.backends if b in BACKENDS.available(device)), None)
    cases = []
    for label, fields, batch, lk in MODEL_SHAPES[config.preset]:
        key = tuple(sorted(fields.items()))

        @functools.cache
        def models(fields=key):
            """Built on first use (the real config takes a while to initialise)."""
            fields = dict(fields)
            if not have_hf:
                return QFormer(QFormerConfig(**fields), backend=backend, device=device, dtype=dtype).eval(), {}
            import transformers

            hf = {}
            for impl, name in (("eager", HF_EAGER), ("sdpa", HF_SDPA)):
                cfg = transformers.Blip2QFormerConfig(**fields, attn_implementation=impl)
                torch.manual_seed(0)
                hf[name] = transformers.Blip2QFormerModel(cfg).to(device=device, dtype=dtype).eval()
            return QFormer.from_hf(hf[HF_SDPA], backend=backend).eval(), hf

        qcfg = QFormerConfig(**fields)
        for mode in MODES:
            train = mode == "fwd+bwd"

            def make_inputs(batch=batch, lk=lk, qcfg=qcfg, train=train):
                q = torch.randn(batch, LQ, qcfg.hidden_size, device=device, dtype=dtype, requires_grad=train)
                return q, torch.randn(batch, lk, qcfg.encoder_hidden_size, device=device, dtype=dtype)

            def ours_fn(x, train=train, models=models):
                model = models()[0]
                if not train:
                    with torch.no_grad():
                        return model(*x)
                out = model(*x)
                out.float().square().mean().backward()
                return out

            def hf_fn(x, name, train=train, models=models):
                model = models()[1][name]
                if not train:
                    with torch.no_grad():
                        return model(query_embeds=x[0], encoder_hidden_states=x[1]).last_hidden_state
                out = model(query_embeds=x[0], encoder_hidden_states=x[1]).last_hidden_state
                out.float().square().mean().backward()
                return out

            providers = {OURS: ours_fn}
            if have_hf:
                providers[HF_EAGER] = functools.partial(hf_fn, name=HF_EAGER)
                providers[HF_SDPA] = functools.partial(hf_fn, name=HF_SDPA)
            flops = qformer_flops(qcfg, num_queries=LQ, image_tokens=lk, batch=batch)["total"]
            cases.append(Case(
                name=f"{label} B={batch} Lq={LQ} Lk={lk}",
                make_inputs=make_inputs,
                providers=providers,
                baseline=HF_SDPA if have_hf else OURS,
                mode=mode,
                flops=flops * (3 if train else 1),
                params={"batch": batch, "queries": batch * LQ, "Lk": lk, **fields},
            ))
    return cases


register_suite(Suite(
    name="qformer",
    description="whole Q-Former queries/s (batch*32 / median): mmkernels QFormer vs HF Blip2QFormerModel eager/SDPA",
    build=_build_model,
    default_dtype=torch.bfloat16,
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

