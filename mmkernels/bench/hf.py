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

Nothing is downloaded. Exit status 0 done, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .device import device_name
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
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}")
    p.add_argument("--size", choices=("tiny", "realistic"), default=None,
                   help="tiny (default on CPU) or realistic (default on GPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="model and input dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default=None, help="mmkernels backend for the patched model (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); 1 gives steady numbers on a shared machine")
    p.add_argument("--out", default=None, help="also write hf_<model>.json to this folder")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    return p


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
    args = _parser().parse_args(argv)
    if args.model not in MODELS:
        _parser().error(f"unknown --model {args.model!r}; expected one of {', '.join(MODELS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        _parser().error("--device cuda: no CUDA device here")
    if args.threads is not None:
        if args.threads < 1:
            _parser().error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    size = args.size or ("realistic" if device.type == "cuda" else "tiny")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        import transformers  # noqa: F401
    except ImportError:
        _parser().error("the hf benchmark needs transformers (pip install transformers)")
    from ..integrations.hf import patch, unpatch

    torch.manual_seed(0)
    model, inputs, output = MODELS[args.model](size == "tiny")
    model = model.to(device=device, dtype=dtype).eval()
    name = device_name(device)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"mmkernels-bench hf --model {args.model} ({type(model).__name__}, {size}, "
          f"{str(dtype).replace('torch.', '')}) on {name} ({device}{threads})", flush=True)
    rows = []
    report = None
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        timings = {}
        for provider in ("unpatched", "patched"):
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
    if args.out:
        path = Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"hf_{args.model}.json").write_text(json.dumps({"rows": rows, "report": str(report)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
