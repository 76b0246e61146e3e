"""``run_local_world``: start W local processes the way ``torchrun`` would, with a deadline.

For CPU runs with gloo (tests, the ``ep`` benchmark) on one machine: each process gets torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the worker calls
``torch.distributed.init_process_group("gloo", timeout=...)`` exactly as under torchrun. Every process is killed when
the deadline passes: a hung collective can never hang the caller.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

__all__ = ["RankResult", "WorldTimeout", "free_port", "run_local_world"]


class WorldTimeout(RuntimeError):
    """The processes did not all finish before the deadline (they have been killed)."""


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str  # stdout and stderr together


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_world(cmd: list[str], world_size: int, *, timeout: float, env: dict[str, str] | None = None,
                    cwd: str | None = None) -> list[RankResult]:
    """Run ``cmd`` in ``world_size`` processes with torchrun's environment variables; wait at most ``timeout`` s.

    Returns one :class:`RankResult` per rank (whatever the return codes: check them). ``env`` is added to this
    process's environment.

    Raises:
        WorldTimeout: some process was still running at the deadline (all are killed; the message holds the
            output of each rank).
        ValueError: ``world_size < 1`` or ``timeout <= 0``.
    """
    if world_size < 1 or timeout <= 0:
        raise ValueError(f"run_local_world: need world_size >= 1 and timeout > 0, got {world_size}, {timeout}")
    base = dict(os.environ)
    base.update(env or {})
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size))
    with tempfile.TemporaryDirectory(prefix="mmkernels-world-") as logs:
        procs, files = [], []
        for rank in range(world_size):
            # A file, not a pipe: a full pipe would block the writer. Closed below, after the processes end.
            f = open(os.path.join(logs, f"rank{rank}.log"), "w+")  # noqa: SIM115
            files.append(f)
            procs.append(subprocess.Popen(cmd, env=base | {"RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=cwd,
                                          stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        results = []
        for rank, (p, f) in enumerate(zip(procs, files)):
            f.seek(0)
            results.append(RankResult(rank, p.returncode, f.read()))
            f.close()
    if timed_out:
        tails = "\n".join(f"--- rank {r.rank} (rc {r.returncode}) ---\n{r.output[-3000:]}" for r in results)
        raise WorldTimeout(f"run_local_world: {world_size} processes still running after {timeout:.0f} s: killed\n"
                           f"{tails}")
    return results
