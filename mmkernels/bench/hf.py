"""``mmkernels-bench hf --model NAME``: a Hugging Face model with and without :func:`mmkernels.integrations.hf.patch`,
timed in the same run: forward and forward+backward medians (p20-p80), peak memory on GPUs, the ratio (unpatched
median / patched median: above 1 means the patch is faster) and the host syncs of one forward.

Models (``--size tiny`` is a few-layer random config for a CPU; ``--size realistic``, the default on GPUs, is the
real shape with random weights):

  vit             ViTModel                    realistic: ViT-B/16 at 224, batch 32
  clip            CLIPVisionModel             realistic: CLIP ViT-L/14-336 tower (LLaVA's), batch 8
  siglip          SiglipVisionModel           realistic: SigLIP So400m/14 at 384, batch 8
  blip2-vision    Blip2VisionModel            realistic: EVA ViT-g/14 at 224, batch 8
  blip2-qformer   Blip2QFormerModel           realistic: BLIP-2's Q-Former, 32 queries over 257 image tokens, B=64
  mixtral-moe     MixtralSparseMoeBlock       realistic: Mixtral-8x7B's block (8 experts, top-2), 4096 tokens
  qwen2_vl        Qwen2VisionTransformerPretrainedModel     realistic: Qwen2-VL-7B's tower (32 x 1280, 16 heads)
  qwen2_5_vl      Qwen2_5_VisionTransformerPretrainedModel  realistic: Qwen2.5-VL-7B's tower (32 x 1280, 16 heads,
                                                            window 112 px, full attention in blocks 7, 15, 23, 31)
  qwen3_vl        Qwen3VLVisionModel          realistic: transformers' Qwen3VLVisionConfig defaults (27 x 1152,
                                              16 heads, patch 16, deepstack 8, 16, 24)
  internvl        InternVLVisionModel         realistic: InternVL3's InternViT-300M (24 x 1024, 16 heads), 7 tiles of
                                              448 px (an 896x1344 image as 2x3 tiles plus its thumbnail)

The Qwen-VL towers take one packed native-resolution batch: the pre-flattened patches of three images of different
sizes and one 4-frame video (t=2 after the temporal patch) with their grid_thw; realistic: 448x448, 644x812, 1092x728
and 4 x 336x588 at patch 14 (the same patch grids at patch 16: 512x512, 736x928, 1248x832, 4 x 384x672), 9764
patches. The output timed (and summed for the backward) is the merger's (plus Qwen3-VL's deepstack features): what
the language model receives. Each row also gives the host syncs of one forward (``.item()``, ``.tolist()``, boolean
masks, ... counted by :class:`mmkernels.testing.count_host_syncs`, after the timed calls); the JSON lists where
they happen.

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

    return model, inputs, lambda out: out.last_hidden_state, f"{batch} images of {size}x{size}"


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

    return model, inputs, lambda out: out.last_hidden_state, f"B={batch}, {queries} queries over {tokens} tokens"


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

    return model, inputs, lambda out: out[0] if isinstance(out, tuple) else out, f"{tokens} tokens"


# Native-resolution batches for the Qwen-VL towers, as grid_thw rows (t, h, w) in patches: three images of different
# sizes and one video of 4 frames (t=2 after the temporal patch). Every h and w is a multiple of the 2x2 merge.
# Realistic at patch 14: 448x448, 644x812, 1092x728 and 4 x 336x588 (9764 patches). Tiny (patch 14 or 16, windows of
# 4x4 patches in qwen2_5_vl): an 8x8 grid splits into 4 windows, 6x10 into 6 (padded at the edges), 4x4 is one.
_QWEN_GRIDS = {False: ((1, 32, 32), (1, 46, 58), (1, 78, 52), (2, 24, 42)),
               True: ((1, 8, 8), (1, 6, 10), (1, 4, 4), (2, 6, 4))}


def _qwen_vl(kind: str, tiny: bool):
    """A Qwen-VL vision tower (random weights) and its packed batch: ``hidden_states`` ``[patches, C*T*P*P]`` and
    ``grid_thw`` ``[4, 3]``; the output is the merged tokens the language model receives."""
    import transformers as tf

    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as cls

        spec = (dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_size=48) if tiny else
                dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584))  # Qwen2-VL-7B
        config = tf.Qwen2VLVisionConfig(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, **spec)
    elif kind == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as cls,
        )

        # window_size is in pixels: window_size // spatial_merge_size // patch_size merged tokens per side (tiny: 2,
        # i.e. windows of 4x4 patches; Qwen2.5-VL's 112: 8x8 patches, 64 tokens).
        spec = (dict(depth=4, hidden_size=80, num_heads=4, intermediate_size=160, out_hidden_size=48, window_size=56,
                     fullatt_block_indexes=[1, 3]) if tiny else
                dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                     window_size=112, fullatt_block_indexes=[7, 15, 23, 31]))  # Qwen2.5-VL-7B
        config = tf.Qwen2_5_VLVisionConfig(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, **spec)
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as cls

        # realistic: Qwen3VLVisionConfig's own defaults (depth 27, 1152 wide, 16 heads of 72, intermediate 4304,
        # patch 16, 48x48 learned position grid, deepstack after blocks 8, 16, 24), spelled out.
        spec = (dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=48,
                     num_position_embeddings=64, deepstack_visual_indexes=[1]) if tiny else
                dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=3584,
                     num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]))
        config = tf.Qwen3VLVisionConfig(patch_size=16, temporal_patch_size=2, spatial_merge_size=2, **spec)
    model = cls(config)
    grids = _QWEN_GRIDS[tiny]
    patches = sum(t * h * w for t, h, w in grids)
    width = config.in_channels * config.temporal_patch_size * config.patch_size ** 2

    def inputs(device, dtype):
        return {"hidden_states": torch.randn(patches, width, device=device, dtype=dtype),
                "grid_thw": torch.tensor(grids, device=device, dtype=torch.long)}

    def output(out):
        deepstack = getattr(out, "deepstack_features", None) or []
        return torch.cat([out.pooler_output, *deepstack]) if deepstack else out.pooler_output

    p = config.patch_size
    sizes = [f"{h * p}x{w * p}" if t == 1 else f"video {t * config.temporal_patch_size} x {h * p}x{w * p}"
             for t, h, w in grids]
    return model, inputs, output, f"{', '.join(sizes)}: {patches} patches"


def _internvl(tiny: bool):
    import transformers as tf

    if tiny:
        config = tf.InternVLVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, image_size=56, patch_size=14)
        tiles = 3
    else:  # InternViT-300M-448px (InternVL3-1B/2B/8B's tower): InternVLVisionConfig's defaults, spelled out
        config = tf.InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                         intermediate_size=4096, image_size=448, patch_size=14)
        tiles = 7  # an 896x1344 image: 2x3 tiles of 448 plus the thumbnail (InternVL's dynamic tiling)
    model = tf.InternVLVisionModel(config)
    size = config.image_size[0]

    def inputs(device, dtype):
        return {"pixel_values": torch.randn(tiles, 3, size, size, device=device, dtype=dtype)}

    return model, inputs, lambda out: out.last_hidden_state, f"{tiles} tiles of {size}x{size}"


MODELS: dict[str, Callable[[bool], tuple]] = {
    "vit": lambda tiny: _vision("vit", tiny),
    "clip": lambda tiny: _vision("clip", tiny),
    "siglip": lambda tiny: _vision("siglip", tiny),
    "blip2-vision": lambda tiny: _vision("blip2-vision", tiny),
    "blip2-qformer": _qformer,
    "mixtral-moe": _mixtral,
    "qwen2_vl": lambda tiny: _qwen_vl("qwen2_vl", tiny),
    "qwen2_5_vl": lambda tiny: _qwen_vl("qwen2_5_vl", tiny),
    "qwen3_vl": lambda tiny: _qwen_vl("qwen3_vl", tiny),
    "internvl": _internvl,
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
             "blip2-qformer": ("attention", "qformer_cross_attention"), "mixtral-moe": ("moe_route", "moe_experts"),
             # issue 22's towers: packed varlen attention, the patch embedding as a GEMM, the vision rotary embedding
             # (an op this build does not register is left out of the check: ``patch`` cannot run it either)
             "qwen2_vl": ("attention", "patch_embed", "rotary_embedding"),
             "qwen2_5_vl": ("attention", "patch_embed", "rotary_embedding"),
             "qwen3_vl": ("attention", "patch_embed", "rotary_embedding"),
             "internvl": ("attention", "patch_embed")}


def _check_backend(backend: str, model: str, device: torch.device) -> str | None:
    """Why ``--backend`` cannot time ``model`` on ``device`` (None: it can)."""
    import mmkernels.ops  # noqa: F401  (registers the ops)

    from .._backends import backend_unavailable_reason, registered_ops

    ops = {op: registered_ops()[op] for op in MODEL_OPS[model] if op in registered_ops()}
    lacking = [op for op, entry in ops.items() if backend not in entry.impls]
    if lacking:
        return (f"--backend {backend}: {model} runs {', '.join(lacking)}, which ha{'s' if len(lacking) == 1 else 've'}"
                f" no {backend!r} backend (they have "
                f"{'; '.join(f'{op}: ' + ', '.join(sorted(ops[op].impls)) for op in lacking)})")
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


def _host_syncs(model, inputs, output, device, dtype, backward: bool) -> dict[str, int]:
    """Where one forward reads tensor values on the host (``{"<what> at <file>:<line>": calls}``; the count is the
    sum): the forward of ``fwd`` (under ``no_grad``) or of ``fwd+bwd`` (with autograd recording), run after the timed
    calls so warm-up-only work (autotuning, first-call checks) is not counted."""
    from ..testing import count_host_syncs

    x = inputs(device, dtype)
    with torch.set_grad_enabled(backward), count_host_syncs() as syncs:
        output(model(**x))
    sites: dict[str, int] = {}
    for call in syncs.calls:
        sites[call] = sites.get(call, 0) + 1
    return sites


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
    model, inputs, output, batch = MODELS[args.model](size == "tiny")
    model = model.to(device=device, dtype=dtype).eval()
    name = device_name(device)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"mmkernels-bench hf --model {args.model} ({type(model).__name__}, {size}, "
          f"{str(dtype).replace('torch.', '')}) on {name} ({device}{threads}); input: {batch}", flush=True)
    if size == "realistic" and device.type == "cpu":
        print("note: --size realistic is sized for a GPU: on this CPU expect minutes per timed provider and several "
              "GB of memory (--size tiny is the CPU size)", flush=True)
    rows = []
    report = None
    sync_sites: dict[str, dict[str, dict[str, int]]] = {"unpatched": {}, "patched": {}}
    start, step = time.monotonic(), 0
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        timings = {}
        for provider in ("unpatched", "patched"):
            step += 1  # progress on stderr: a realistic model takes a while per provider
            print(f"[{step}/4 {time.monotonic() - start:.0f}s] {mode}: {provider}", file=sys.stderr, flush=True)
            if provider == "patched":
                report = patch(model, backend=args.backend)
            timings[provider] = _time(model, inputs, output, device, dtype, args.warmup_ms, args.rep_ms, backward)
            sync_sites[provider][mode] = _host_syncs(model, inputs, output, device, dtype, backward)
            unpatch(model)
        ratio = timings["unpatched"].median_ms / timings["patched"].median_ms
        for provider, t in timings.items():
            rows.append({"model": args.model, "size": size, "mode": mode, "provider": provider, "device": name,
                         "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                         "peak_mem_mb": t.peak_mem_mb, "ratio": ratio if provider == "patched" else None,
                         "host_syncs_per_fwd": sum(sync_sites[provider][mode].values())})
    print(str(report))
    header = (f"{'mode':8s} {'provider':10s} {'median ms':>10s} {'p20-p80 ms':>19s} {'mem MB':>9s} {'ratio':>7s} "
              f"{'syncs/fwd':>9s}")
    print(header)
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['mode']:8s} {r['provider']:10s} {r['median_ms']:10.3f} {r['p20_ms']:9.3f}-{r['p80_ms']:<9.3f} "
              f"{mem:>9s} {ratio:>7s} {r['host_syncs_per_fwd']:9d}")
    print("ratio = unpatched median / patched median, same run, same inputs; syncs/fwd = host syncs in one forward "
          "(.item(), .tolist(), boolean masks, ...; where: the JSON's host_sync_sites)")
    if not report:
        print(f"note: patch() replaced nothing in {type(model).__name__} (see the report above): both providers ran "
              "the same code, so the rows differ only by noise.")
    if device.type == "cpu":
        print("note: on CPU the patched model runs our plain-PyTorch references (the Triton kernels need a GPU).")
    if args.out is not None:
        path = Path(args.out) / _out_name(args.model)
        text = json.dumps({"rows": rows, "report": str(report), "input": batch, "host_sync_sites": sync_sites},
                          indent=1)
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
