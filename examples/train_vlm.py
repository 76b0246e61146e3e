"""Train mmkernels' vision-language model (ViT -> Q-Former -> ScMoE decoder) on a synthetic image-caption task.

    python examples/train_vlm.py                                  # tiny preset, CPU, about two minutes
    python examples/train_vlm.py --preset small --device cuda     # a GPU
    python examples/train_vlm.py --plot curves.png                # draw loss and balancer curves
    python examples/train_vlm.py --ckpt ckpt.pt --save-every 50   # checkpoint; --resume ckpt.pt continues exactly
    torchrun --nproc-per-node 2 examples/train_vlm.py --ep 2      # the decoder's experts in expert parallel

The task: each image holds one coloured square (colour, quadrant and size drawn at random, plus pixel noise); its
caption is a deterministic function of that content: ``<bos> <colour> square <quadrant> [big] <eos>`` right-padded.
The model must read the image through the Q-Former to predict the caption.

Logged every step (console progress bar, and a JSON-lines file, ``--jsonl``): loss, tokens/s, and per decoder layer
the mean FFN experts per token (target K_e), max/mean FFN load (1.0 = perfect balance) and the FFN bias range.

The balancer recipe (docs/balancer_training.md): the router trains jointly with the rest, with the PID bias at
``ki`` = 0.3 (``--ki``) and LongCat-Flash's device-level balance loss at 0.1 (``--balance-loss``), the defaults of
``ScMoEConfig`` (``bias_ki``, ``balance_loss_coef``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmkernels.bench import _args
from mmkernels.models import VisionLanguageModel, VLMConfig

# ---- the synthetic task -------------------------------------------------------------------------------------------

PAD, BOS, EOS, SQUARE, BIG = 0, 1, 2, 3, 4
COLOURS = (5, 6, 7)  # red, green, blue: the channel the square is drawn in
QUADRANTS = (8, 9, 10, 11)  # top-left, top-right, bottom-left, bottom-right
CAPTION_LEN = 6  # <bos> colour square quadrant [big] <eos>, right-padded
WORDS = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", SQUARE: "square", BIG: "big", 5: "red", 6: "green", 7: "blue",
         8: "top-left", 9: "top-right", 10: "bottom-left", 11: "bottom-right"}


def make_batch(step: int, batch: int, image_size: int, *, seed: int = 0, device="cpu"):
    """Images [B, 3, S, S], captions int64 [B, CAPTION_LEN] and their right padding mask, a function of
    (seed, step) only: a resumed run sees the same data without any saved data-loader state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    colour = torch.randint(0, 3, (batch,), generator=g)
    quadrant = torch.randint(0, 4, (batch,), generator=g)
    big = torch.randint(0, 2, (batch,), generator=g).bool()
    half = image_size // 2
    pixels = 0.1 * torch.randn(batch, 3, image_size, image_size, generator=g)
    for b in range(batch):
        side = half if big[b] else half // 2
        y0 = (quadrant[b] // 2) * half + (half - side) // 2
        x0 = (quadrant[b] % 2) * half + (half - side) // 2
        pixels[b, colour[b], y0:y0 + side, x0:x0 + side] += 1.0
    ids = torch.full((batch, CAPTION_LEN), PAD, dtype=torch.int64)
    ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = BOS, torch.tensor(COLOURS)[colour], SQUARE, \
        torch.tensor(QUADRANTS)[quadrant]
    ids[:, 4] = torch.where(big, BIG, EOS)
    ids[:, 5] = torch.where(big, EOS, PAD)
    pad = ids == PAD
    return pixels.to(device), ids.to(device), pad.to(device)


def caption_loss(logits: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the caption tokens after <bos> (position i predicts token i+1)."""
    target = ids[:, 1:].masked_fill(pad[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100)


# ---- configuration ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    preset: str = "tiny"
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    router_lr: float | None = None  # None: lr (the router trains jointly, at the same rate)
    weight_decay: float = 0.0
    warmup: int = 10
    seed: int = 0
    device: str = "cpu"
    backend: str | None = None
    # balancer recipe (docs/balancer_training.md); None: the ScMoEConfig default (bias_ki, balance_loss_coef)
    ki: float | None = None  # PID integral gain of the expert bias
    kp: float = 0.0
    ki_decay: float = 0.0  # ki(t) = ki * max(ki_floor, exp(-ki_decay * t))
    ki_floor: float = 1.0
    max_abs: float | None = None
    balance_loss: float | None = None  # alpha of LongCat-Flash's device-level balance loss (0: off)
    router_init_std: float | None = None  # None: the layer's default init; 0 starts every router uniform
    ep: int = 1
    log: str | None = None  # JSON-lines file
    ckpt: str | None = None  # checkpoint file written every save_every steps and at the end
    save_every: int = 0
    resume: str | None = None
    resume_state: dict | None = field(default=None, repr=False, compare=False)  # --resume, already read (main)
    progress: bool = True

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


class _GainSchedule:
    """``step -> max(floor, exp(-decay * step))``; a class (not a lambda) so the model pickles and deep-copies."""

    def __init__(self, decay: float, floor: float) -> None:
        self.decay, self.floor = decay, floor

    def __call__(self, step: int) -> float:
        return max(self.floor, math.exp(-self.decay * step))


def build(cfg: TrainConfig):
    """Model and optimiser for ``cfg`` (seeded)."""
    torch.manual_seed(cfg.seed)
    vlm_cfg = VLMConfig.preset(cfg.preset)
    changes = {k: x for k, x in (("bias_ki", cfg.ki), ("balance_loss_coef", cfg.balance_loss)) if x is not None}
    vlm_cfg = vlm_cfg.replace(decoder=vlm_cfg.decoder.replace(**changes))
    group = None
    if cfg.ep > 1:
        group = dist.group.WORLD
    model = VisionLanguageModel(vlm_cfg, backend=cfg.backend, ep_group=group, device=cfg.device)
    for layer in model.decoder.layers:
        moe = layer.mlp
        ctrl = moe.balancer
        ctrl.kp, ctrl.max_abs = cfg.kp, cfg.max_abs
        ctrl.gain_schedule = _GainSchedule(cfg.ki_decay, cfg.ki_floor) if cfg.ki_decay > 0 else None
        if cfg.router_init_std is not None:
            with torch.no_grad():
                moe.router.weight.normal_(0.0, cfg.router_init_std) if cfg.router_init_std > 0 else \
                    moe.router.weight.zero_()
    router = [p for n, p in model.named_parameters() if ".router." in n]
    rest = [p for n, p in model.named_parameters() if ".router." not in n]
    groups = [{"params": rest}]
    if router:
        groups.append({"params": router, "lr": cfg.router_lr if cfg.router_lr is not None else cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return model, opt


# ---- checkpoints --------------------------------------------------------------------------------------------------


CHECKPOINT_KEYS = ("model", "optimizer", "step", "records", "rng")


class CheckpointError(ValueError):
    """A --resume file that is not a checkpoint of this script, or not one of this model (one line)."""


def save_checkpoint(path: str, model, opt, step: int, records: list) -> None:
    """Model (balancer bias, state and step counters included), optimiser, RNG states, step and the log so far.

    Written to a temporary file in the same folder, then moved over ``path`` (never a half-written checkpoint); only
    a missing path or a regular file is replaced: a FIFO, device node or folder there is an ``OSError``, untouched."""
    state = {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "records": records,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    _args.replace_file(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str) -> dict:
    """The checkpoint at ``path`` as :func:`save_checkpoint` wrote it; :class:`CheckpointError` (one line) when it
    is not a readable regular non-empty file or not such a checkpoint."""
    try:
        _args.in_file(path, "--resume")
    except _args.UsageError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, not a torch file, unpickling errors: all one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}"
                              f"{': ' + first if first else ''})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"--resume {path}: not a checkpoint of this script (missing {', '.join(missing)})")
    return state


def load_checkpoint(path: str | dict, model, opt) -> tuple[int, list]:
    """Restore ``model``, ``opt`` and the RNG states from a checkpoint (a path, or the dict
    :func:`read_checkpoint` returned); :class:`CheckpointError` when it does not fit this model."""
    state = read_checkpoint(path) if not isinstance(path, dict) else path
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"--resume: the checkpoint does not fit this model and flags ({first})") from None
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["records"]


# ---- training -----------------------------------------------------------------------------------------------------


def layer_metrics(model) -> list[dict]:
    """Per decoder layer, from the balancer's last update: FFN experts per token, max/mean FFN load, bias range."""
    out = []
    for layer in model.decoder.layers:
        m = layer.mlp.balancer.metrics()
        out.append({k: round(float(v), 5) for k, v in m.items()})
    return out


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the log lines carry the numbers
        return None
    return tqdm(total=total, initial=initial, dynamic_ncols=True, leave=True)


def train(cfg: TrainConfig) -> list[dict]:
    """Train; returns one record per step (also written to ``cfg.log`` as JSON lines)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, opt = build(cfg)
    model.train()
    start, records = 0, []
    if cfg.resume:
        start, records = load_checkpoint(cfg.resume_state if cfg.resume_state is not None else cfg.resume, model, opt)
    log = _args.open_log(cfg.log) if cfg.log and rank == 0 else None  # never blocks on a FIFO or writes a device
    if log is not None:  # a resumed run rewrites the log up to its checkpoint: steps after it are not logged twice
        for record in records:
            log.write(json.dumps(record) + "\n")
    bar = _progress(cfg.steps, start, cfg.progress and rank == 0)
    image_size = model.config.vision.image_size
    per_rank = cfg.batch // max(cfg.ep, 1)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            pixels, ids, pad = make_batch(step, cfg.batch, image_size, seed=cfg.seed, device=cfg.device)
            if cfg.ep > 1:  # data parallel over the expert-parallel ranks: each takes its slice of the batch
                sl = slice(rank * per_rank, (rank + 1) * per_rank)
                pixels, ids, pad = pixels[sl], ids[sl], pad[sl]
            scale = min(1.0, (step + 1) / max(cfg.warmup, 1))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            logits = model(pixels, ids, padding_mask=pad)
            ce = caption_loss(logits, ids, pad)
            loss = ce
            aux = model.balance_loss()  # coefficient x device-level balance loss (None when off)
            if aux is not None:
                loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.ep > 1:
                # Replicated parameters: average over the ranks' batch slices. A rank's experts already got the
                # gradient from every rank's tokens (through the all-to-all), each scaled by its rank's mean loss:
                # divide by the world size to get the global mean's gradient.
                for n, p in model.named_parameters():
                    if p.grad is None:
                        continue
                    if ".experts." in n:
                        p.grad.div_(cfg.ep)
                    else:
                        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            opt.step()
            model.update_bias()  # one balancer step per optimizer step, from this step's counts
            dt = time.perf_counter() - t0
            tokens = int((~pad).sum()) + pixels.shape[0] * model.num_query_tokens
            rec = {"step": step + 1, "loss": float(ce.detach()),
                   "balance_loss": None if aux is None else float(aux.detach()),
                   "tokens_per_s": tokens / dt, "layers": layer_metrics(model)}
            records.append(rec)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if bar is not None:
                ffn = "/".join(f"{m['ffn_experts_per_token']:.2f}" for m in rec["layers"])
                mx = "/".join(f"{m['max_over_mean_ffn_load']:.2f}" for m in rec["layers"])
                bias = " ".join(f"[{m['bias_min']:+.2f},{m['bias_max']:+.2f}]" for m in rec["layers"])
                bar.set_postfix_str(f"loss {rec['loss']:.3f} tok/s {rec['tokens_per_s']:.0f} FFN/tok {ffn} "
                                    f"max/mean {mx} bias {bias}")
                bar.update(1)
            if cfg.ckpt and rank == 0 and ((cfg.save_every and (step + 1) % cfg.save_every == 0)
                                            or step + 1 == cfg.steps):
                save_checkpoint(cfg.ckpt, model, opt, step + 1, records)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return records


def summary(records: list[dict], target: float, last: int = 10) -> dict:
    """Mean FFN experts per token and max/mean load over the last ``last`` steps, per layer, and the loss drop."""
    tail = records[-last:]
    n_layers = len(tail[0]["layers"])
    ffn = [sum(r["layers"][i]["ffn_experts_per_token"] for r in tail) / len(tail) for i in range(n_layers)]
    load = [sum(r["layers"][i]["max_over_mean_ffn_load"] for r in tail) / len(tail) for i in range(n_layers)]
    first = sum(r["loss"] for r in records[:5]) / min(5, len(records))
    final = sum(r["loss"] for r in tail) / len(tail)
    return {"ffn_per_token": ffn, "max_over_mean_load": load, "target": target, "loss_first": first,
            "loss_last": final, "loss_drop": first / max(final, 1e-12),
            "ffn_error": max(abs(f - target) for f in ffn), "worst_load": max(load)}


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].semilogy(steps, [r["loss"] for r in records])
    ax[0].set(title="caption loss", xlabel="step")
    for i in range(len(records[0]["layers"])):
        ax[1].plot(steps, [r["layers"][i]["ffn_experts_per_token"] for r in records], label=f"layer {i}")
        ax[2].plot(steps, [r["layers"][i]["max_over_mean_ffn_load"] for r in records], label=f"layer {i}")
    ax[1].set(title="FFN experts per token", xlabel="step")
    ax[2].set(title="max / mean FFN load", xlabel="step")
    ax[1].legend()
    ax[2].legend()
    fig.tight_layout()
    # PNG at exactly ``path`` (matplotlib would add ".png" to a name without it), through a temporary file
    _args.replace_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _number(low: float, *, strict: bool = False, kind=float):
    """argparse ``type=``: a finite number ``>= low`` (``> low`` when ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} {'>' if strict else '>='} {low:g}, got {text!r}")
        return value

    return parse


def _check(a, p: argparse.ArgumentParser) -> None:
    """Everything that can be wrong with the flags, checked before any model is built (one line, exit 2): a run
    must not train to the end and then fail to plot, hang on a FIFO, or replace a device node with a checkpoint."""
    from mmkernels._env import check

    problems = check()
    if problems:
        p.error(f"environment: {problems[0]}")
    try:
        dev = _args.device(a.device)
    except _args.UsageError as exc:
        p.error(str(exc))
    if a.backend is not None:  # every op of the model must have it (the model checks at construction: on meta, free)
        from mmkernels import BackendError
        from mmkernels._backends import backend_unavailable_reason

        try:
            VisionLanguageModel(VLMConfig.preset(a.preset), backend=a.backend, device="meta")
        except BackendError as exc:
            p.error(f"--backend {a.backend}: {exc}")
        reason = backend_unavailable_reason(a.backend, dev)
        if reason is not None:
            p.error(f"--backend {a.backend} cannot run on {dev}: {reason}")
    if a.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            p.error("--plot needs matplotlib (pip install matplotlib)")
        problem = _args.matplotlib_problem()
        if problem:
            p.error(f"--plot {problem}")
    try:  # every output file: a regular file or a new one in an existing, writable folder
        for flag, path in (("--plot", a.plot), ("--jsonl", a.jsonl), ("--ckpt", a.ckpt)):
            if path is not None:
                _args.out_file(path, flag)
    except _args.UsageError as exc:
        p.error(str(exc))
    if a.save_every and a.ckpt is None:
        p.error("--save-every needs --ckpt FILE")
    if a.ep > 1:
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            p.error(f"--ep {a.ep}: run under torchrun (torchrun --nproc-per-node {a.ep} examples/train_vlm.py "
                    f"--ep {a.ep} ...); {', '.join(missing)} not set")
        if os.environ["WORLD_SIZE"] != str(a.ep):
            p.error(f"--ep {a.ep} needs torchrun with {a.ep} processes, got WORLD_SIZE={os.environ['WORLD_SIZE']}")
        if a.batch % a.ep:
            p.error(f"--batch ({a.batch}) must be divisible by --ep ({a.ep})")
    if a.resume is not None:  # read now: a bad file is one line before anything is built
        try:
            a.resume_state = read_checkpoint(a.resume)
        except CheckpointError as exc:
            p.error(str(exc))


def main(argv=None) -> None:
    defaults = TrainConfig()
    p = _args.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=defaults.preset, choices=["tiny", "small"])
    p.add_argument("--steps", type=_number(1, kind=int), default=defaults.steps)
    p.add_argument("--batch", type=_number(1, kind=int), default=defaults.batch)
    p.add_argument("--lr", type=_number(0, strict=True), default=defaults.lr)
    p.add_argument("--router-lr", type=_number(0, strict=True), default=None)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, choices=("cuda", "cpp", "triton", "reference"),
                   help="one backend for every op (default: auto)")
    p.add_argument("--ki", type=_number(0), default=None, help="bias PID ki (default: ScMoEConfig.bias_ki)")
    p.add_argument("--kp", type=_number(0), default=defaults.kp)
    p.add_argument("--ki-decay", type=_number(0), default=defaults.ki_decay)
    p.add_argument("--ki-floor", type=_number(0), default=defaults.ki_floor)
    p.add_argument("--max-abs", type=_number(0, strict=True), default=None)
    p.add_argument("--balance-loss", type=_number(0), default=None,
                   help="device-level loss alpha (default: ScMoEConfig.balance_loss_coef)")
    p.add_argument("--router-init-std", type=_number(0, strict=True), default=None)
    p.add_argument("--ep", type=_number(1, kind=int), default=1, help="expert-parallel ranks (run under torchrun)")
    p.add_argument("--jsonl", default="train_vlm.jsonl", help="JSON-lines log file")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--save-every", type=_number(0, kind=int), default=0)
    p.add_argument("--resume", default=None, help="a checkpoint --ckpt wrote: continue from it exactly")
    p.add_argument("--plot", default=None, nargs="?", const="train_vlm.png",
                   help="write the curves to this PNG file (PNG whatever the name ends with)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=_args.threads, default=None,
                   help="torch intra-op threads, at most 4 per CPU (1 is fastest for tiny on a busy CPU)")
    a = p.parse_args(argv)
    a.resume_state = None
    _check(a, p)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ep > 1:
        dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
        if a.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            a.device = f"cuda:{torch.cuda.current_device()}"
    cfg = TrainConfig(preset=a.preset, steps=a.steps, batch=a.batch, lr=a.lr, router_lr=a.router_lr, seed=a.seed,
                      device=a.device, backend=a.backend, ki=a.ki, kp=a.kp, ki_decay=a.ki_decay, ki_floor=a.ki_floor,
                      max_abs=a.max_abs, balance_loss=a.balance_loss, router_init_std=a.router_init_std, ep=a.ep,
                      log=a.jsonl, ckpt=a.ckpt, save_every=a.save_every, resume=a.resume,
                      resume_state=a.resume_state, progress=not a.no_progress)
    t0 = time.time()
    try:
        records = train(cfg)
    except CheckpointError as exc:  # the checkpoint does not fit the model these flags build: still one line
        p.error(str(exc))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        target = VLMConfig.preset(cfg.preset).decoder.target_ffn_per_token
        s = summary(records, target)
        print(f"{cfg.steps} steps in {time.time() - t0:.1f}s on {cfg.device}: loss {s['loss_first']:.3f} -> "
              f"{s['loss_last']:.3f} ({s['loss_drop']:.1f}x); last 10 steps: FFN experts/token "
              + ", ".join(f"{f:.3f}" for f in s["ffn_per_token"]) + f" (target {target}), max/mean load "
              + ", ".join(f"{x:.2f}" for x in s["max_over_mean_load"]))
        if a.plot:
            plot(records, a.plot)
            print(f"curves written to {a.plot}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
