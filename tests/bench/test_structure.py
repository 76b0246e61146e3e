"""The harness's shape (issue 20 item 5): the timing core is borrowed (``do_bench`` on CUDA, ``timeit`` on CPUs) and
only the policy is ours; ``timing`` and ``device`` do not import each other; suites register by being a file in
``bench/suites``; ``mmkernels-bench list`` rejects every flag that only changes what is timed or written."""

from __future__ import annotations

import ast
import contextlib
import importlib
import pkgutil
import sys
import types
from pathlib import Path

import pytest
import torch

import mmkernels.bench.cli as cli
import mmkernels.bench.suites as suites_pkg
import mmkernels.bench.timing as bench_timing
from mmkernels.bench import registered_suites, time_fn

BENCH = Path(bench_timing.__file__).parent


def _harness_imports(path: Path) -> set[str]:
    """The ``mmkernels.bench`` modules a file imports (at any depth: function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "")
            found.update(a.name for a in node.names if node.module is None)
    return found


def test_timing_imports_no_harness_module_and_device_imports_only_timing():
    assert _harness_imports(BENCH / "timing.py") == set(), "timing is the bottom of the harness"
    assert _harness_imports(BENCH / "device.py") == {"timing"}


def test_every_file_in_the_suites_folder_is_discovered_and_registers_a_suite():
    files = sorted(p.stem for p in (BENCH / "suites").glob("*.py") if not p.stem.startswith("_"))
    assert list(suites_pkg.SUITE_MODULES) == files
    registered = {s.shapes.__module__ for s in registered_suites().values()}
    assert {f"mmkernels.bench.suites.{name}" for name in files} <= registered
    init = ast.parse((BENCH / "suites" / "__init__.py").read_text())
    named = [n for n in ast.walk(init) if isinstance(n, ast.ImportFrom) and n.module is None]
    assert not named, "suites/__init__.py names no suite module: a new suite is one new file"


def test_a_new_suite_file_registers_without_editing_the_harness(tmp_path, monkeypatch):
    """A module dropped in a suites folder is found by the package's discovery (the package's own ``__init__`` run
    over a scratch folder, so the real registry gains only the toy)."""
    extra = tmp_path / "extra_suites"
    extra.mkdir()
    (extra / "zz_toy.py").write_text(
        "from mmkernels.bench.suite import Suite, register_suite\n"
        "register_suite(Suite('zz_toy', 'a toy', shapes=lambda config, ours: []))\n")
    (extra / "_helper.py").write_text("raise AssertionError('helpers are not imported')\n")
    pkg = types.ModuleType("zz_suites_copy")
    pkg.__path__ = [str(extra)]
    monkeypatch.setitem(sys.modules, "zz_suites_copy", pkg)
    source = (BENCH / "suites" / "__init__.py").read_text()
    exec(compile(source, "suites/__init__.py", "exec"), pkg.__dict__)  # noqa: S102  (the package's own discovery)
    assert pkg.SUITE_MODULES == ("zz_toy",)
    assert "zz_toy" in registered_suites()
    from mmkernels.bench import suite as suite_mod

    monkeypatch.delitem(suite_mod._SUITES, "zz_toy")


@pytest.mark.parametrize("attr, flag", cli._RUN_ONLY_FLAGS)
def test_list_rejects_every_run_only_flag(attr, flag, tmp_path, capsys):
    argv = {"out": ["--out", str(tmp_path)], "plot": ["--plot"], "warmup_ms": ["--warmup-ms", "3"],
            "rep_ms": ["--rep-ms", "3"], "l2_flush": ["--no-l2-flush"], "cuda_graph": ["--cuda-graph"],
            "backends": ["--backends", "reference"], "dtype": ["--dtype", "fp32"], "shapes": ["--shapes", "quick"]}
    assert cli.main(["list", *argv[attr]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and flag in err[0] and "`list` times nothing and writes no files" in err[0], err
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_every_parser_option_is_classified_for_list():
    """A new option must say whether `list` rejects it: none is silently ignored."""
    dests = {a.dest for a in cli._parser()._actions if a.option_strings}
    assert dests - {attr for attr, _ in cli._RUN_ONLY_FLAGS} == {"help", "quick", "device"}


def test_list_still_lists_with_quick_and_a_device(capsys):
    assert cli.main(["list", "--quick", "--device", "cpu"]) == 0
    assert "attention" in capsys.readouterr().out


def test_summary_statistics_are_torch_quantiles():
    times = [5.0, 1.0, 3.5, 2.0, 9.0, 4.0, 7.25]
    t = bench_timing._summary(times, peak_mem_mb=None)
    ref = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    assert (t.p20_ms, t.median_ms, t.p80_ms) == pytest.approx(ref.tolist())
    assert t.min_ms == 1.0 and t.reps == 7
    one = bench_timing._summary([2.5], peak_mem_mb=None)
    assert (one.p20_ms, one.median_ms, one.p80_ms, one.reps) == (2.5, 2.5, 2.5, 1)


def test_cpu_times_come_from_timeit(monkeypatch):
    """On a CPU every sample is one ``timeit`` call of one statement: the harness keeps no clock of its own."""
    samples = []
    real = bench_timing.timeit.Timer

    class Counting(real):
        def timeit(self, number=1):
            assert number == 1
            samples.append(number)
            return 0.004  # 4 ms per call, whatever the call did

    monkeypatch.setattr(bench_timing.timeit, "Timer", Counting)
    t = time_fn(lambda x: None, lambda: None, device=torch.device("cpu"), warmup_ms=1, rep_ms=10, min_reps=3)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.min_ms) == (4.0, 4.0, 4.0, 4.0)
    assert len(samples) >= t.reps + 3, "first call, at least two warm-up samples, then the timed ones"


class _FakeDriver:
    def get_empty_cache_for_benchmark(self):
        return "triton's 256 MiB buffer"

    def clear_cache(self, cache):
        raise AssertionError("triton's own L2 clear must not run")


@pytest.mark.parametrize("flush", [False, True])
def test_do_bench_l2_clear_is_routed_to_our_flush_policy_and_restored(monkeypatch, flush):
    """CUDA rows are timed by ``triton.testing.do_bench``; its per-call L2 clear becomes our flush then a
    synchronize (or nothing), its own buffer is never allocated, and the driver is restored afterwards (driven on
    a fake driver: the check needs no GPU)."""
    triton_runtime = pytest.importorskip("triton.runtime")
    fake = _FakeDriver()
    monkeypatch.setattr(triton_runtime, "driver", types.SimpleNamespace(active=fake))
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    with bench_timing._l2_policy((lambda: log.append("flush")) if flush else None, torch.device("cuda", 0)):
        assert fake.get_empty_cache_for_benchmark() is None
        fake.clear_cache(None)
    assert log == (["flush", "sync"] if flush else [])
    assert "clear_cache" not in vars(fake) and "get_empty_cache_for_benchmark" not in vars(fake)
    assert fake.get_empty_cache_for_benchmark() == "triton's 256 MiB buffer"


def test_do_bench_times_calls_after_our_flush_and_tops_up_to_min_reps(monkeypatch):
    """``_do_bench`` driven through a stand-in for ``triton.testing.do_bench`` that does what it does (its L2 clear
    before each timed call, events around the call only): every timed call follows our flush and synchronize, and a
    first run with fewer than ``min_reps`` calls is followed by a longer one (no GPU needed)."""
    triton_runtime = pytest.importorskip("triton.runtime")
    import triton.testing

    fake = _FakeDriver()
    monkeypatch.setattr(triton_runtime, "driver", types.SimpleNamespace(active=fake))
    log, reps = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    def do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "all"
        cache = fake.get_empty_cache_for_benchmark()
        n = 2 if not reps else int(rep)  # the first run: too few calls for p20/p80
        reps.append(rep)
        times = []
        for _ in range(n):
            fake.clear_cache(cache)
            log.append("start")
            fn()
            log.append("end")
            times.append(1.0)
        return times

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    times = bench_timing._do_bench(lambda: log.append("call"), torch.device("cuda", 0), 1.0, 10.0, 5,
                                   lambda: log.append("flush"))
    assert len(reps) == 2 and reps[1] == pytest.approx(10.0 * 5 / 2 * 1.25) and len(times) == int(reps[1])
    assert log == ["flush", "sync", "start", "call", "end"] * (2 + len(times)), "flush and sync outside the events"
    assert "clear_cache" not in vars(fake)


@pytest.mark.gpu
def test_cuda_rows_are_timed_by_do_bench(monkeypatch):
    import triton.testing

    calls = []
    real = triton.testing.do_bench

    def spy(fn, **kw):
        calls.append(kw)
        return real(fn, **kw)

    monkeypatch.setattr(triton.testing, "do_bench", spy)
    dev = torch.device("cuda", torch.cuda.current_device())
    t = time_fn(lambda x: x.add_(1), lambda: torch.randn(1 << 16, device=dev), device=dev, warmup_ms=2, rep_ms=5)
    assert calls and calls[0]["return_mode"] == "all" and t.reps >= 5 and t.median_ms > 0


def test_importing_the_suites_twice_registers_nothing_new():
    before = dict(registered_suites())
    importlib.reload(suites_pkg)
    assert list(registered_suites()) == list(before)
    assert [m.name for m in pkgutil.iter_modules(suites_pkg.__path__) if not m.name.startswith("_")] == \
        list(suites_pkg.SUITE_MODULES)
