"""``mmkernels-bench hf --model NAME``: a Hugging Face model with and without :func:`mmkernels.integrations.hf.patch`,
timed in the same run: forward and forward+backward medians (p20-p80), peak memory on GPUs, and the ratio
(unpatched median / patched median: above 1 means the patch is faster).

Models (``--size tiny`` is a few-layer random config for a CPU; ``--size realistic``, the default on GPUs, is the
real shape with random weights):

  vit             ViTModel                    realistic: ViT-B/16 at 224, batch 32
  clip            CLIPVisionModel             realistic: CLIP ViT-L/14-336 tower (LLaVA's), batch 8
  siglip          SiglipVisionModel           realistic: SigLIP So400m/14 at 384, batch 8
  blip2-vision    Blip2VisionModel            realistic: EVA ViT-g/14 at 224, batch 8
  blip2-qformer   Blip2QFormerModel           realistic: BLIP-2's Q-Former, 32 queries over 257 image tokens, B=64
  mixtral-moe     MixtralSparseMoeBlock       realistic: Mixtral-8x7B's block (8 experts, top-2), 4096 tokens

Nothing is downloaded. Exit status 0 done, 2 a usage error (one line on stderr, checked before the model is built: an
unknown model, device (cpu or cuda[:N]), backend, a backend this model's ops lack or that cannot run on the device,
an --out that is empty or cannot be written or whose hf_<model>.json is not a regular file (a FIFO or device there is
never opened), a time outside 0 ms...1 hour, --threads outside 1...4 per CPU, a bad MMKERNELS_* variable)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._backends import BACKENDS
from . import _args
from .device import device_name
from .suite import has_module
from .timing import time_fn

__all__ = ["MODELS", "main"]


def _vision(kind: str, tiny: bool):
    import transformers as tf

    if tiny:
        spec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8)
        batch = 2
    else:
        spec = {
            "vit": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16),
            "clip": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14),
            "siglip": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14),
            "blip2-vision": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                 num_attention_heads=16, image_size=224, patch_size=14),
        }[kind]
        batch = 32 if kind == "vit" else 8
    if kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(**spec), add_pooling_layer=False)
    elif kind == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**spec))
    elif kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**spec))
    else:
        model = tf.Blip2VisionModel(tf.Blip2VisionConfig(**spec))
    size = spec["image_size"]

    def inputs(device, dtype):
        return {"pixel_values": torch.randn(batch, 3, size, size, device=device, dtype=dtype)}

    return model, inputs, lambda out: out.last_hidden_state


def _qformer(tiny: bool):
    import transformers as tf

    if tiny:
        cfg = tf.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    encoder_hidden_size=24)
        batch, queries, tokens = 2, 8, 17
    else:
        cfg = tf.Blip2QFormerConfig(encoder_hidden_size=1408)  # BLIP-2's: 12 layers, 768 wide, cross every 2nd
        batch, queries, tokens = 64, 32, 257
    model = tf.Blip2QFormerModel(cfg)

    def inputs(device, dtype):
        return {"query_embeds": torch.randn(batch, queries, cfg.hidden_size, device=device, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, tokens, cfg.encoder_hidden_size, device=device,
                                                     dtype=dtype)}

    return model, inputs, lambda out: out.last_hidden_state


def _mixtral(tiny: bool):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if tiny:
        cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        tokens = 64
    else:
        cfg = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)
        tokens = 4096
    model = MixtralSparseMoeBlock(cfg)

    def inputs(device, dtype):
        return {"hidden_states": torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)}

    return model, inputs, lambda out: out[0] if isinstance(out, tuple) else out


MODELS: dict[str, Callable[[bool], tuple]] = {
    "vit": lambda tiny: _vision("vit", tiny),
    "clip": lambda tiny: _vision("clip", tiny),
    "siglip": lambda tiny: _vision("siglip", tiny),
    "blip2-vision": lambda tiny: _vision("blip2-vision", tiny),
    "blip2-qformer": _qformer,
    "mixtral-moe": _mixtral,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmkernels-bench hf", description=__doc__.split("\n\n", 1)[0],
                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=list(MODELS), metavar="MODEL", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--size", choices=("tiny", "realistic"), default=None,
                   help="tiny (default on CPU) or realistic (default on GPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="model and input dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="mmkernels backend for every op of the patched model (default: auto); one that this model's "
                        "ops lack or that cannot run on the device is a usage error")
    p.add_argument("--threads", type=_args.threads, default=None,
                   help="CPU threads for torch (default: torch's; at most 4 per CPU); 1 gives steady numbers on a "
                        "shared machine")
    p.add_argument("--out", default=None, help="also write hf_<model>.json to this folder")
    p.add_argument("--warmup-ms", type=_args.milliseconds, default=25.0, help="warm-up per provider (default 25)")
    p.add_argument("--rep-ms", type=_args.milliseconds, default=100.0, help="timed time per provider (default 100)")
    return p


# The mmkernels ops ``patch`` runs in each model (checked against --backend before the model is built).
MODEL_OPS = {"vit": ("attention", "patch_embed"), "clip": ("attention", "patch_embed"),
             "siglip": ("attention", "patch_embed"), "blip2-vision": ("attention", "patch_embed"),
             "blip2-qformer": ("attention", "qformer_cross_attention"), "mixtral-moe": ("moe_route", "moe_experts")}


def _check_backend(backend: str, model: str, device: torch.device) -> str | None:
    """Why ``--backend`` cannot time ``model`` on ``device`` (None: it can)."""
    import mmkernels.ops  # noqa: F401  (registers the ops)

    from .._backends import backend_unavailable_reason, registered_ops

    lacking = [op for op in MODEL_OPS[model] if backend not in registered_ops()[op].impls]
    if lacking:
        return (f"--backend {backend}: {model} runs {', '.join(lacking)}, which ha{'s' if len(lacking) == 1 else 've'}"
                f" no {backend!r} backend (they have "
                f"{'; '.join(f'{op}: ' + ', '.join(sorted(registered_ops()[op].impls)) for op in lacking)})")
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        return f"--backend {backend} cannot run on {device}: {reason}"
    return None


def _time(model, inputs, output, device, dtype, warmup_ms, rep_ms, backward: bool):
    def fwd(x):
        with torch.no_grad():
            return output(model(**x))

    def fwd_bwd(x):
        model.zero_grad(set_to_none=True)
        output(model(**x)).float().sum().backward()

    return time_fn(fwd_bwd if backward else fwd, lambda: inputs(device, dtype), device=device, warmup_ms=warmup_ms,
                   rep_ms=rep_ms, pool=2)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def _main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:  # every check before the model is built (a realistic one takes a while): one line, exit 2
        _args.check_env()
        device = _args.device(args.device)
        if args.out is not None:
            _args.out_dir(args.out, files=[_out_name(args.model)])
    except _args.UsageError as exc:
        parser.error(str(exc))
    if args.backend is not None:
        problem = _check_backend(args.backend, args.model, device)
        if problem:
            parser.error(problem)
    if not has_module("transformers"):
        parser.error("the hf benchmark needs transformers (pip install transformers)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = args.size or ("realistic" if device.type == "cuda" else "tiny")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from ..integrations.hf import patch, unpatch

    torch.manual_seed(0)
    model, inputs, output = MODELS[args.model](size == "tiny")
    model = model.to(device=device, dtype=dtype).eval()
    name = device_name(device)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"mmkernels-bench hf --model {args.model} ({type(model).__name__}, {size}, "
          f"{str(dtype).replace('torch.', '')}) on {name} ({device}{threads})", flush=True)
    if size == "realistic" and device.type == "cpu":
        print("note: --size realistic is sized for a GPU: on this CPU expect minutes per timed provider and several "
              "GB of memory (--size tiny is the CPU size)", flush=True)
    rows = []
    report = None
    start, step = time.monotonic(), 0
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        timings = {}
        for provider in ("unpatched", "patched"):
            step += 1  # progress on stderr: a realistic model takes a while per provider
            print(f"[{step}/4 {time.monotonic() - start:.0f}s] {mode}: {provider}", file=sys.stderr, flush=True)
            if provider == "patched":
                report = patch(model, backend=args.backend)
            timings[provider] = _time(model, inputs, output, device, dtype, args.warmup_ms, args.rep_ms, backward)
            unpatch(model)
        ratio = timings["unpatched"].median_ms / timings["patched"].median_ms
        for provider, t in timings.items():
            rows.append({"model": args.model, "size": size, "mode": mode, "provider": provider, "device": name,
                         "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                         "peak_mem_mb": t.peak_mem_mb, "ratio": ratio if provider == "patched" else None})
    print(str(report))
    header = f"{'mode':8s} {'provider':10s} {'median ms':>10s} {'p20-p80 ms':>19s} {'mem MB':>9s} {'ratio':>7s}"
    print(header)
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['mode']:8s} {r['provider']:10s} {r['median_ms']:10.3f} {r['p20_ms']:9.3f}-{r['p80_ms']:<9.3f} "
              f"{mem:>9s} {ratio:>7s}")
    print("ratio = unpatched median / patched median, same run, same inputs")
    if device.type == "cpu":
        print("note: on CPU the patched model runs our plain-PyTorch references (the Triton kernels need a GPU).")
    if args.out is not None:
        path = Path(args.out) / _out_name(args.model)
        text = json.dumps({"rows": rows, "report": str(report)}, indent=1)
        try:
            _args.replace_file(path, lambda tmp: Path(tmp).write_text(text))
        except OSError as exc:  # e.g. a FIFO put there during the run: never opened; one line, exit 1
            print(f"mmkernels-bench hf: cannot write {path}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    return 0


def _out_name(model: str) -> str:
    """The file ``--out`` gets for ``model``."""
    return f"hf_{model}.json"


if __name__ == "__main__":
    sys.exit(main())
