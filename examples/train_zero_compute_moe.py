"""Train a small LongCat-style MoE block with zero-computation experts and the PID bias balancer.

    python examples/train_zero_compute_moe.py [--steps 200] [--device cuda] [--threads N]

On a CPU it runs one torch thread unless --threads says otherwise (about a minute for the defaults on a 2-core
machine; with torch's default thread count it took ten times longer there). Bad flags or MMKERNELS_* variables stop it
before training, with one line and exit status 2.

A ZeroComputeMoE (N FFN experts + Z identity experts, top-k) learns a random teacher MLP on skewed inputs
(router frozen, experts trained).
Every optimizer step also updates the expert bias from the step's selection counts, on the device, with no
host synchronisation; the log shows the two things the balancer controls: the mean number of FFN experts per
token (target K_e) and the max/mean FFN load (1.0 is perfect balance).
"""

from __future__ import annotations

import time

import torch

from mmkernels.bench import _args
from mmkernels.nn import ZeroComputeMoE, update_expert_biases


def main(argv=None) -> None:
    parser = _args.OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_args.positive_int, default=200)
    parser.add_argument("--tokens", type=_args.positive_int, default=2048, help="tokens per step")
    parser.add_argument("--device", type=_args.device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=_args.threads, default=None,
                        help="torch intra-op threads on a CPU, at most 4 per CPU (default 1: this block's matrices are "
                             "small, and more threads cost more in synchronisation than they give, many times slower "
                             "on a busy CPU)")
    args = parser.parse_args(argv)
    from mmkernels._env import check

    problems = check()  # a bad MMKERNELS_* variable: stop before training, not at the first op that reads it
    if problems:
        parser.error(f"environment: {problems[0]}")
    dev = args.device
    if dev.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads is not None:
        torch.set_num_threads(args.threads)  # the host threads of a GPU run
    torch.manual_seed(0)
    hidden, n, z, k, k_e = 64, 32, 16, 6, 4.0
    moe = ZeroComputeMoE(hidden, n, z, k, 96, routed_scaling_factor=1.0, target_ffn_per_token=k_e,
                         balancer_kwargs=dict(ki=0.3, gain_schedule=lambda t: max(0.1, 0.98**t)), device=dev)
    teacher = torch.nn.Sequential(torch.nn.Linear(hidden, 256), torch.nn.GELU(), torch.nn.Linear(256, hidden)).to(dev)
    skew = torch.randn(hidden, device=dev) * 2  # inputs share a direction: the router starts out unbalanced
    # The router is frozen here so the log isolates what the balancer does; a trained router also moves the
    # load, and then the balancer competes with its gradient (a smaller ki, a device-level balance loss).
    moe.router.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=3e-3)
    start = time.time()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.tokens, hidden, device=dev) + skew
        with torch.no_grad():
            target = teacher(x)
        loss = torch.nn.functional.mse_loss(moe(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_expert_biases(moe)  # one bias update per optimizer step, from this step's counts
        if step == 1 or step % 25 == 0:
            m = {name: value.item() for name, value in moe.balancer.metrics().items()}  # .item() only to log
            print(f"step {step:4d}  loss {loss.item():.4f}  FFN experts/token {m['ffn_experts_per_token']:.2f} "
                  f"(target {k_e})  max/mean FFN load {m['max_over_mean_ffn_load']:.2f}  "
                  f"bias [{m['bias_min']:+.4f}, {m['bias_max']:+.4f}]")
    print(f"{args.steps} steps in {time.time() - start:.1f}s on {dev} ({torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
