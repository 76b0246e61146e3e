"""``expert_bias_update``: the on-device bias update against a plain PyTorch controller that syncs to the host.

The baseline is what a training script would otherwise write: copy the counts to the host, do the PID step in
NumPy, copy the bias back. On a GPU that is a device->host sync per step; ours is one small kernel launch.
"""

from __future__ import annotations

import numpy as np
import torch

from ...ops.expert_bias import OP, expert_bias_update_
from ..suite import MICROSECOND, BenchConfig, Inputs, Shape, Suite, mmkernels_providers, register_suite

# (N FFN experts, Z zero experts, top-k K, target K_e): LongCat-Flash-Lite, LongCat-Flash, a DeepSeek-V3 router.
SHAPES = {
    "quick": [(256, 128, 12, 8.0), (512, 256, 12, 8.0)],
    "default": [(256, 128, 12, 8.0), (512, 256, 12, 8.0), (256, 0, 8, 8.0), (2048, 1024, 16, 10.0)],
}
GAINS = {"kp": 0.01, "ki": 0.05, "kd": 0.0}


def host_sync_update(bias, counts, state, n, k, target, kp, ki, kd, mode) -> None:
    """The baseline: the same rule in NumPy on the host (a device->host copy, i.e. a sync, every step)."""
    c = counts.cpu().numpy().astype(np.int64)
    b = bias.cpu().numpy()
    s = state.cpu().numpy()
    total = c.sum()
    if total == 0:
        return
    if mode == "sign":
        diff = c[:n].sum() - n * c[:n]
        b[:n] += np.float32(ki) * np.sign(diff).astype(np.float32)
    else:
        e = np.float32(target / (k * n)) - c[:n].astype(np.float32) / np.float32(total)
        b[:n] += ki * e + kp * (e - s[0]) + kd * (e - 2 * s[0] + s[1])
        s[1], s[0] = s[0].copy(), e
    bias.copy_(torch.from_numpy(b))
    state.copy_(torch.from_numpy(s))


def _shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device = config.device
    shapes = []
    for n, z, k, target in SHAPES[config.preset]:
        for mode in ("pid", "sign"):
            def make_inputs(grad, n=n, z=z, k=k):
                tokens = 4096
                counts = torch.bincount(torch.randint(0, n + z, (tokens * k,)), minlength=n + z).to(torch.int32)
                return Inputs((torch.zeros(n + z, device=device), counts.to(device), torch.zeros(2, n, device=device)))

            def ours_fn(backend, n=n, k=k, target=target, mode=mode):
                return lambda bias, counts, state: expert_bias_update_(
                    bias, counts, state, num_ffn_experts=n, top_k=k, target_ffn_per_token=target, mode=mode,
                    backend=backend, **GAINS)

            providers = mmkernels_providers(ours, ours_fn)
            providers["torch-host-sync"] = (
                lambda *x, n=n, k=k, target=target, mode=mode: host_sync_update(*x, n, k, target, mode=mode, **GAINS)
            )
            n_total = n + z
            # FLOPs: the counts' sum (N+Z adds) and about 12 per FFN expert (share, error, the P/I/D terms, the
            # step). Bytes: int32 counts [N+Z] read; fp32 bias[:N] read and written (bias[N:] is never touched);
            # pid: fp32 state [2, N] read and written.
            shapes.append(Shape(
                name=f"N={n} Z={z} K={k} {mode}",
                make_inputs=make_inputs,
                providers=providers,
                baseline="torch-host-sync",
                flops=float(n_total + 12 * n),
                bytes=float(4 * n_total + 8 * n + (16 * n if mode == "pid" else 0)),
                params={"N": n, "Z": z, "K": k, "K_e": target, "mode": mode},
            ))
    return shapes


register_suite(Suite(
    name="expert_bias_update",
    description="PID/sign expert-bias update, on device, vs a host-syncing PyTorch controller",
    shapes=_shapes,
    ops=(OP,),
    tags=(MICROSECOND,),
))
