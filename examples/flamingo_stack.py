"""Train a tiny Flamingo-style stack (ViT -> Perceiver Resampler -> gated cross-attention blocks interleaved with
ScMoE decoder layers) on synthetic interleaved image-text data.

    python examples/flamingo_stack.py                   # CPU, about 5 seconds (60 steps)
    python examples/flamingo_stack.py --device cuda --backend reference

The task: every sample is ``<bos> <image> <colour> square <image> <colour> square <eos>`` with two images, each a
noisy 16x16 picture of a square in one of three colour channels; the ``<colour>`` token after each ``<image>`` names
the colour of *that* image. The decoder sees the pictures only through the gated cross-attention blocks (each text
token attends to the resampled latents of the last image at or before it: ``media_locations`` marks the
``<image>`` tokens; ``<bos>`` comes before any image and gets no attention update), so the loss on the colour
tokens falls below chance (log 3) only once the vision path works: a model blind to the images cannot get the mean
loss over the 7 predicted tokens below 2 log(3) / 7 = 0.31. Logged: the loss, the colour accuracy and the attention
gates (they start at 0).

Bad flags or ``MMKERNELS_*`` variables stop it before training, with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.bench import _args
from mmkernels.models import GatedCrossAttentionBlock, PerceiverResampler, ScMoEConfig, ScMoEDecoderLayer, ViT
from mmkernels.models.vit import ViTConfig

PAD, BOS, EOS, IMAGE, SQUARE = 0, 1, 2, 3, 4
COLOURS = (5, 6, 7)  # red, green, blue
SEQUENCE = (BOS, IMAGE, -1, SQUARE, IMAGE, -2, SQUARE, EOS)  # -1 / -2: the colour of image 0 / 1
NUM_IMAGES, IMAGE_SIZE = 2, 16


def make_batch(batch: int, generator: torch.Generator, device="cpu"):
    """pixels ``[B, 2, 3, 16, 16]``, token ids ``[B, 8]`` and the positions of the colour tokens ``[B, 8]``."""
    colour = torch.randint(0, 3, (batch, NUM_IMAGES), generator=generator)
    pixels = 0.3 * torch.randn(batch, NUM_IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    corner = torch.randint(0, IMAGE_SIZE // 2, (batch, NUM_IMAGES, 2), generator=generator)
    for b in range(batch):
        for t in range(NUM_IMAGES):
            y, x = corner[b, t].tolist()
            pixels[b, t, colour[b, t], y:y + IMAGE_SIZE // 2, x:x + IMAGE_SIZE // 2] += 1.0
    ids = torch.tensor(SEQUENCE).repeat(batch, 1)
    colour_tokens = torch.tensor(COLOURS)[colour]
    is_colour = ids < 0
    ids[:, SEQUENCE.index(-1)] = colour_tokens[:, 0]
    ids[:, SEQUENCE.index(-2)] = colour_tokens[:, 1]
    return pixels.to(device), ids.to(device), is_colour.to(device)


class FlamingoStack(nn.Module):
    """Vision encoder and resampler feeding gated cross-attention blocks, one before each decoder layer."""

    def __init__(self, *, backend=None, device=None) -> None:
        super().__init__()
        dim = 32
        decoder = ScMoEConfig.preset("tiny")  # hidden 32, 2 layers, 128-token vocabulary
        self.vision = ViT(ViTConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=dim, num_layers=1, num_heads=2,
                                    mlp_dim=64), backend=backend)
        self.resampler = PerceiverResampler(dim, 1, dim_head=8, heads=4, num_latents=8, num_media_embeds=NUM_IMAGES,
                                            ff_mult=2, backend=backend)
        self.embed = nn.Embedding(decoder.vocab_size, dim)
        self.xattn = nn.ModuleList(GatedCrossAttentionBlock(dim, dim_head=8, heads=4, ff_mult=2, backend=backend)
                                   for _ in range(decoder.num_layers))
        self.layers = nn.ModuleList(ScMoEDecoderLayer(decoder, backend=backend) for _ in range(decoder.num_layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, decoder.vocab_size, bias=False)
        self.to(device)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = pixels.shape[:2]
        media = self.resampler(self.vision(pixels.flatten(0, 1)).unflatten(0, (B, T)))  # [B, T, latents, dim]
        media_locations = input_ids == IMAGE
        h = self.embed(input_ids)
        for xattn, layer in zip(self.xattn, self.layers):
            h = layer(xattn(h, media, media_locations))
        return self.lm_head(self.norm(h))


def train(steps: int = 60, *, batch: int = 16, lr: float = 3e-3, device="cpu", backend=None, seed: int = 0,
          log=print) -> list[float]:
    """Trains a fresh stack; returns the loss of every step."""
    torch.manual_seed(seed)
    model = FlamingoStack(backend=backend, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    start = time.time()
    for step in range(1, steps + 1):
        pixels, ids, is_colour = make_batch(batch, g, device)
        logits = model(pixels, ids)[:, :-1]
        targets = ids[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 1 or step % 10 == 0 or step == steps:
            colour = is_colour[:, 1:]
            accuracy = (logits.argmax(-1)[colour] == targets[colour]).float().mean().item()
            gates = [round(b.attn_gate.item(), 3) for b in model.xattn]
            log(f"step {step:4d}  loss {losses[-1]:.4f}  colour accuracy {accuracy:.2f}  attn gates {gates}  "
                f"({time.time() - start:.1f} s)")
    return losses


def _lr(text: str) -> float:
    value = _args.finite(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def main(argv=None) -> list[float]:
    parser = _args.OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_args.positive_int, default=60)
    parser.add_argument("--batch", type=_args.positive_int, default=16)
    parser.add_argument("--lr", type=_lr, default=3e-3)
    parser.add_argument("--device", type=_args.device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="one backend name for every op (default: auto)")
    parser.add_argument("--threads", type=_args.threads, default=None, help="torch threads on a CPU (default 1)")
    args = parser.parse_args(argv)
    from mmkernels._env import check

    problems = check()
    if problems:
        parser.error(f"environment: {problems[0]}")
    if args.backend is not None:
        try:
            FlamingoStack(backend=args.backend, device="meta")
        except (ValueError, TypeError, RuntimeError) as exc:
            parser.error(f"--backend {args.backend}: {exc}")
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    losses = train(args.steps, batch=args.batch, lr=args.lr, device=args.device, backend=args.backend)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
