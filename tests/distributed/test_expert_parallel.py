"""ExpertParallelMoE on 2 and 4 gloo processes (CPU) against the single-process ZeroComputeMoE.

One spawned world per world size runs every scenario of ``_ep_worker.py`` (spawning costs seconds on a small
machine); each test below reports one scenario. Every collective has a timeout in the workers, and the whole world
is killed at a deadline.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from mmkernels.distributed.launch import run_local_world

WORKER = os.path.join(os.path.dirname(__file__), "_ep_worker.py")
DEADLINE_S = 240

ALL = ["equal", "equal_uneven_shapes", "skewed", "zero_tokens", "all_zero_experts", "padding", "async_handles",
       "balancer", "state_dict", "mismatch", "mesh_and_all_to_all", "unused_expert_grads", "ddp_unused",
       "dcp_reshard", "sync_budget"]
# World 4 adds: DCP resharding 2 -> 1 -> 4 -> 2, and DDP over the dp dimension of a (dp=2) x (ep=2) mesh.
WORLD4 = ["equal", "skewed", "zero_tokens", "all_zero_experts", "mismatch", "state_dict", "mesh_and_all_to_all",
          "unused_expert_grads", "ddp_unused", "dcp_reshard"]


def run_world(world: int, scenarios: list[str], out_dir) -> list[dict]:
    """Run the scenarios on ``world`` processes; return each rank's {scenario: "ok" | traceback}."""
    results = run_local_world([sys.executable, WORKER, str(out_dir), *scenarios], world, timeout=DEADLINE_S)
    per_rank = []
    for r in results:
        path = os.path.join(out_dir, f"rank{r.rank}.json")
        if r.returncode != 0 or not os.path.exists(path):
            raise AssertionError(f"rank {r.rank} exited with {r.returncode}:\n{r.output[-4000:]}")
        with open(path) as f:
            per_rank.append(json.load(f))
    return per_rank


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_world(2, ALL, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_world(4, WORLD4, tmp_path_factory.mktemp("ep4"))


def check(per_rank: list[dict], scenario: str) -> None:
    failures = [f"rank {r}:\n{res.get(scenario, 'not run')}" for r, res in enumerate(per_rank)
                if res.get(scenario) != "ok"]
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", ALL)
def test_world_of_two(world2, scenario):
    check(world2, scenario)


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", WORLD4)
def test_world_of_four(world4, scenario):
    check(world4, scenario)
