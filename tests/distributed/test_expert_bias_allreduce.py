"""ExpertBiasController under torch.distributed: 2 gloo processes on CPU sum their counts with one all-reduce."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N, Z, K, K_E = 24, 8, 4, 3.0
WORLD = 2


def rank_counts(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)  # a different batch on every rank and step
    return torch.randint(0, 40, (N + Z,), generator=g, dtype=torch.int32)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from mmkernels.nn import ExpertBiasController

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ctrl = ExpertBiasController(N, Z, K, K_E, kp=0.1, ki=0.5)
        for step in range(3):
            counts = rank_counts(rank, step)
            pending = ctrl.start_update(counts)
            pending.wait()
            assert torch.equal(counts, rank_counts(rank, step)), "the caller's counts must not be modified"
        torch.save({"bias": ctrl.bias, "state": ctrl.state, "last": ctrl.last_counts}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_counts_all_reduced_over_two_gloo_ranks(tmp_path):
    from mmkernels.nn import ExpertBiasController

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    single = ExpertBiasController(N, Z, K, K_E, kp=0.1, ki=0.5)
    for step in range(3):
        single.update(sum(rank_counts(r, step) for r in range(WORLD)).to(torch.int32))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(results):
        assert torch.equal(res["last"], single.last_counts), f"rank {r} did not see the global counts"
        assert torch.equal(res["bias"], single.bias) and torch.equal(res["state"], single.state), f"rank {r}"
