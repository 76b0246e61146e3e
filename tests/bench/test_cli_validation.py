"""Every ``mmkernels-bench`` subcommand (but ``ep``, tested with its own CLI), ``python -m mmkernels.info`` and the
examples refuse every bad flag value and every bad ``MMKERNELS_*`` variable before any work: exit status 2, exactly one
line on stderr naming the flag or variable, nothing on stdout (a run prints its header only once it starts work).

Run in-process through each ``main(argv)`` (fast); a few cases also through the real entry points as subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkernels._env import VARIABLES
from mmkernels.bench.cli import main as bench_main
from mmkernels.bench.hf import MODEL_OPS, MODELS

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = not torch.cuda.is_available()
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def no_device_node_is_ever_replaced(monkeypatch):
    """A safety net for the tests below, which hand links to /dev/null as output paths: a regression that tried to
    move a file over a device node fails the test instead of replacing the node (we may run as root)."""
    real_replace = os.replace

    def guarded(src, dst, *args, **kwargs):
        if os.path.realpath(dst).startswith("/dev/"):
            pytest.fail(f"os.replace onto {os.path.realpath(dst)}")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", guarded)


def _fifo(path):
    os.mkfifo(path)
    return str(path)


def _folder_with(tmp_path, folder, name, kind):
    """``folder``/``name`` made a FIFO, a link to /dev/null (a character device) or a folder."""
    d = tmp_path / folder
    d.mkdir()
    target = d / name
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "devnull":
        target.symlink_to("/dev/null")
    else:
        target.mkdir()
    return str(d)


@pytest.fixture
def paths(tmp_path):
    """Paths to pass where a folder or a file is wanted: a regular file, a FIFO, a link to /dev/null, a folder, a path
    under /proc (cannot be created), an empty and a garbage file, a missing folder with a trailing slash, and --out
    folders holding a FIFO, a /dev/null link or a folder where the command writes its result files. Never a real /dev
    node: a bug must not be able to destroy one."""
    regular = tmp_path / "a_file"
    regular.write_text("x")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    devnull = tmp_path / "devnull"
    devnull.symlink_to("/dev/null")
    (tmp_path / "a_dir").mkdir()
    out = {"FILE": str(regular), "FIFO": _fifo(tmp_path / "a_fifo"), "PROC": "/proc/mmkernels_no_such_dir/x",
           "DEVNULL": str(devnull), "DIR": str(tmp_path / "a_dir"), "EMPTY": str(tmp_path / "empty"),
           "GARBAGE": str(tmp_path / "garbage.pt"), "OTHER_PT": str(tmp_path / "other.pt"),
           "MISSING_DIR/": str(tmp_path / "no_such_dir" / "dirx") + "/", "DIR/": str(tmp_path / "a_dir") + "/"}
    for folder, name in (("results.json", "results.json"), ("results.csv", "results.csv"),
                         ("speedup", "speedup_attention.png"), ("hf", "hf_vit.json"), ("ep", "ep.json"),
                         ("ep_png", "ep_timeline.png")):
        for kind in ("fifo", "devnull", "dir"):
            key = f"OUT_{folder.upper()}_{kind.upper()}"
            out[key] = _folder_with(tmp_path, f"{folder}_{kind}", name, kind)
    return out


def _expand(argv, paths):
    out = []
    for a in argv:
        head, sep, tail = a.partition("/")
        out.append(paths[a] if a in paths else (paths[head + "/"] + tail if sep and head + "/" in paths else a))
    return out


def _one_line_exit_2(capsys, rc, *needles):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert out == "", out  # nothing started
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# (argv, what the one line must name)
BENCH = [
    (["attention", "--device", "bogus"], "--device"),
    (["attention", "--device", "mps"], "--device"),
    (["attention", "--device", "cuda:7"], "--device"),
    (["attention", "--out", "FILE"], "--out"),
    (["attention", "--out", "FIFO"], "--out"),
    (["attention", "--out", "PROC"], "--out"),
    (["attention", "--rep-ms", "nan"], "--rep-ms"),
    (["attention", "--rep-ms", "inf"], "--rep-ms"),
    (["attention", "--rep-ms", "-1"], "--rep-ms"),
    (["attention", "--rep-ms", "abc"], "--rep-ms"),
    (["attention", "--warmup-ms", "nan"], "--warmup-ms"),
    (["attention", "--shapes", "bogus"], "--shapes"),
    (["patch_embed", "--shapes", "sweep"], "--shapes"),
    (["attention", "--dtype", "fp64"], "--dtype"),
    (["attention", "--backends", "bogus"], "--backends"),
    (["attention", "--backends", "cuda"], "--backends"),
    (["attention", "--plot"], "--plot"),
    (["no_such_op"], "no_such_op"),
    (["list", "--device", "bogus"], "--device"),
    (["attention", "--no-such-flag"], "--no-such-flag"),
    # issue 19 (h4): output files that must never be opened, empty paths, huge times, odd devices, `list` misuse
    (["attention", "--out", ""], "--out ''"),
    (["moe_route", "--quick", "--out", "DEVNULL"], "--out"),
    *[(["moe_route", "--quick", "--out", f"OUT_{f}_{k}"], name) for f, name in
      (("RESULTS.JSON", "results.json"), ("RESULTS.CSV", "results.csv")) for k in ("FIFO", "DEVNULL", "DIR")],
    *[(["attention", "--quick", "--plot", "--out", f"OUT_SPEEDUP_{k}"], "speedup_attention.png")
      for k in ("FIFO", "DEVNULL", "DIR") if HAS_MATPLOTLIB],
    (["attention", "--plot", "--out", ""], "--out ''"),
    (["attention", "--warmup-ms", "1e300"], "--warmup-ms"),
    (["attention", "--rep-ms", "3600001"], "--rep-ms"),
    (["attention", "--device", "cpu:1"], "--device"),
    (["list", "extra"], "`list` takes no op names"),
    (["attention", "list"], "`list` takes no op names"),
]
TUNE = [
    (["tune", "no_such_kernel"], "no_such_kernel"),
    (["tune"], "OP"),
    (["tune", "all", "--budget", "nan"], "--budget"),
    (["tune", "all", "--budget", "0"], "--budget"),
    (["tune", "all", "--dtype", "fp32"], "--dtype"),
    (["tune", "all", "--device", "bogus"], "--device"),
    (["tune", "all", "--device", "cpu"], "--device"),
    (["tune", "all", "--out", "FIFO"], "--out"),
    (["tune", "all", "--out", "PROC"], "--out"),
    (["tune", "all", "--target", "sm_70"], "--target"),
    (["tune", "all", "--out", ""], "--out ''"),
    (["tune", "all", "--out", "DEVNULL"], "--out"),
    (["tune", "all", "--budget", "1e300"], "--budget"),
]
HF = [
    (["hf"], "--model"),
    (["hf", "--model", "bogus"], "--model"),
    (["hf", "--model", "vit", "--device", "bogus"], "--device"),
    (["hf", "--model", "vit", "--device", "mps"], "--device"),
    (["hf", "--model", "vit", "--backend", "bogus"], "--backend"),
    (["hf", "--model", "vit", "--backend", "cpp"], "--backend"),
    (["hf", "--model", "mixtral-moe", "--backend", "triton"], "--backend"),
    *[(["hf", "--model", m, "--backend", "cpp"], "--backend")
      for m in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")],  # issue 22's towers: attention has no cpp
    (["hf", "--model", "vit", "--out", "FILE"], "--out"),
    (["hf", "--model", "vit", "--out", "PROC"], "--out"),
    (["hf", "--model", "vit", "--rep-ms", "nan"], "--rep-ms"),
    (["hf", "--model", "vit", "--warmup-ms", "-1"], "--warmup-ms"),
    (["hf", "--model", "vit", "--threads", "0"], "--threads"),
    (["hf", "--model", "vit", "--size", "huge"], "--size"),
    (["hf", "--model", "vit", "--dtype", "fp64"], "--dtype"),
    (["hf", "--model", "vit", "--out", ""], "--out ''"),
    *[(["hf", "--model", "vit", "--out", f"OUT_HF_{k}"], "hf_vit.json") for k in ("FIFO", "DEVNULL", "DIR")],
    (["hf", "--model", "vit", "--threads", "1000000"], "--threads"),
    (["hf", "--model", "vit", "--device", "cpu:1"], "--device"),
    (["hf", "--model", "vit", "--warmup-ms", "1e300"], "--warmup-ms"),
    (["hf", "--model", "vit", "--rep-ms", "1e12"], "--rep-ms"),
]
GPU_ONLY = [  # valid requests on a GPU machine; here they must be refused for want of one
    (["attention", "--device", "cuda"], "--device"),
    (["hf", "--model", "vit", "--device", "cuda"], "--device"),
    (["hf", "--model", "vit", "--backend", "cuda"], "--backend"),
]


@pytest.mark.parametrize("argv,names", BENCH + TUNE + HF + (GPU_ONLY if NO_GPU else []),
                         ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_every_subcommand_refuses_every_bad_flag_with_one_line_and_exit_2(capsys, paths, argv, names):
    rc = bench_main(_expand(argv, paths))
    prog = "mmkernels-bench" + (f" {argv[0]}" if argv and argv[0] in ("tune", "hf") else "")
    line = _one_line_exit_2(capsys, rc, names)
    assert line.startswith(f"{prog}: error: "), line


BAD_ENV = {
    "MMKERNELS_BACKEND": "nonsense",
    "MMKERNELS_ATTENTION_PACKED": "2",
    "MMKERNELS_AUTOTUNE": "maybe",
    "MMKERNELS_DEBUG_CHECKS": "sometimes",
    "MMKERNELS_NO_EXTENSION": "perhaps",
    "MMKERNELS_TUNING_DEVICE": "NVIDIA\x07H100",
    "MMKERNELS_TUNING_DIR": "FILE",
}
COMMANDS = {
    "bench": ["attention", "--quick"],
    "bench-list": ["list"],
    "tune": ["tune", "all", "--dry-run"],
    "hf": ["hf", "--model", "vit"],
}


def test_the_bad_env_table_covers_every_variable():
    assert set(BAD_ENV) == set(VARIABLES)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("var", BAD_ENV)
def test_every_subcommand_refuses_every_bad_environment_variable(capsys, paths, monkeypatch, command, var):
    monkeypatch.setenv(var, paths.get(BAD_ENV[var], BAD_ENV[var]))
    rc = bench_main(COMMANDS[command])
    _one_line_exit_2(capsys, rc, var, "environment")


@pytest.mark.parametrize("var", BAD_ENV)
def test_info_refuses_every_bad_environment_variable(capsys, paths, monkeypatch, var):
    from mmkernels._info import main as info_main

    monkeypatch.setenv(var, paths.get(BAD_ENV[var], BAD_ENV[var]))
    _one_line_exit_2(capsys, info_main([]), var, "python -m mmkernels.info: error: environment")


def test_hf_backend_check_agrees_with_what_patch_does():
    """--backend is refused before the model is built exactly where ``patch`` would refuse it after: MODEL_OPS names
    the ops ``patch`` runs in each model (checked on the tiny models, every backend)."""
    import warnings

    from mmkernels._backends import BACKENDS, BackendError, registered_ops
    from mmkernels.integrations.hf import patch, unpatch

    pytest.importorskip("transformers")
    for name, build in MODELS.items():
        model = build(True)[0]
        for backend in BACKENDS:
            lacking = [op for op in MODEL_OPS[name] if backend not in registered_ops()[op].impls]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    patch(model, backend=backend)
                unpatch(model)
                refused = False
            except BackendError:
                refused = True
            assert refused == bool(lacking), (name, backend, lacking)


def _run(args, env=None, timeout=180):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MMKERNELS_")}
    full.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=full)


@pytest.mark.parametrize("args,env,needle", [
    (["-m", "mmkernels.bench", "hf", "--model", "vit", "--device", "bogus"], {}, "--device"),
    (["-m", "mmkernels.bench", "attention", "--rep-ms", "nan"], {}, "--rep-ms"),
    (["-m", "mmkernels.bench", "attention"], {"MMKERNELS_AUTOTUNE": "maybe"}, "MMKERNELS_AUTOTUNE"),
    (["-m", "mmkernels.info"], {"MMKERNELS_BACKEND": "nonsense"}, "MMKERNELS_BACKEND"),
    (["examples/train_zero_compute_moe.py", "--threads", "0"], {}, "--threads"),
    (["examples/train_vlm.py", "--lr", "nan"], {}, "--lr"),
    (["examples/train_vlm.py"], {"MMKERNELS_ATTENTION_PACKED": "yes"}, "MMKERNELS_ATTENTION_PACKED"),
])
def test_entry_points_as_processes(args, env, needle):
    out = _run(args, env)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_a_bad_no_extension_value_leaves_the_extension_unloaded_with_a_warning_and_tools_exit_2():
    """MMKERNELS_NO_EXTENSION is read while ``import mmkernels`` runs, so a bad value cannot stop the import: the
    extension stays unloaded with an ExtensionWarning naming the variable, and the tools refuse to start."""
    code = ("import warnings; warnings.simplefilter('error'); import mmkernels")
    out = _run(["-c", code], {"MMKERNELS_NO_EXTENSION": "perhaps"})
    assert out.returncode == 1 and "MMKERNELS_NO_EXTENSION='perhaps' is not valid" in out.stderr, out.stderr
    out = _run(["-m", "mmkernels.bench", "list"], {"MMKERNELS_NO_EXTENSION": "perhaps"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1].startswith("mmkernels-bench: error: environment: "
                                                          "MMKERNELS_NO_EXTENSION='perhaps'"), out.stderr


def _example(name):
    key = f"_mmkernels_example_{name}"
    if key not in sys.modules:  # registered first: dataclasses look their module up while the file runs
        spec = importlib.util.spec_from_file_location(key, ROOT / "examples" / f"{name}.py")
        module = sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.mark.parametrize("argv,needle", [
    (["--plot", "curves.png"], "--plot needs matplotlib"),  # run with matplotlib hidden
    (["--plot", "PROC"], "--plot"),
    (["--steps", "0"], "--steps"),
    (["--batch", "-2"], "--batch"),
    (["--lr", "inf"], "--lr"),
    (["--device", "bogus"], "--device"),
    (["--backend", "bogus"], "--backend"),
    (["--backend", "cpp"], "--backend cpp: VisionLanguageModel: attention has no 'cpp' backend"),
    (["--backend", "triton"], "--backend triton: VisionLanguageModel: moe_route has no 'triton' backend"),
    (["--threads", "0"], "--threads"),
    (["--ep", "0"], "--ep"),
    (["--resume", "PROC"], "--resume"),
    (["--save-every", "5"], "--save-every"),
    (["--jsonl", "PROC"], "--jsonl"),
    # issue 19 (h4): output files that must never be opened or replaced, inputs that are not checkpoints
    *[([flag, key], flag) for flag in ("--ckpt", "--jsonl", "--plot")
      for key in ("FIFO", "DEVNULL", "DIR", "DIR/", "MISSING_DIR/", "")],
    (["--plot", "MISSING_DIR/curves.png"], "does not exist"),
    (["--resume", "EMPTY"], "is empty"),
    (["--resume", "FIFO"], "is a FIFO"),
    (["--resume", "DEVNULL"], "is a character device"),
    (["--resume", "DIR"], "is a folder"),
    (["--resume", ""], "--resume ''"),
    (["--resume", "GARBAGE"], "not a readable checkpoint"),
    (["--resume", "OTHER_PT"], "not a checkpoint of this script"),
    (["--ep", "2"], "run under torchrun"),
    (["--device", "cpu:1"], "--device"),
    (["--threads", "1000000"], "--threads"),
])
def test_train_vlm_refuses_bad_flags_before_training(capsys, paths, monkeypatch, argv, needle):
    module = _example("train_vlm")
    monkeypatch.setattr(module, "train", lambda cfg: pytest.fail("trained with a bad flag"))
    monkeypatch.setattr(module, "build", lambda cfg: pytest.fail("built a model with a bad flag"))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(paths["DIR"])  # the default --jsonl lands here
    if needle.startswith("--plot needs"):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec answers None: not installed
    with pytest.raises(SystemExit) as exc:
        module.main(_expand(argv, paths))
    _one_line_exit_2(capsys, exc.value.code, needle)


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "0"], "--steps"), (["--tokens", "x"], "--tokens"), (["--device", "bogus"], "--device"),
    (["--threads", "-1"], "--threads"), (["--threads", "1000000"], "--threads"), (["--device", "cpu:1"], "--device"),
])
def test_train_zero_compute_moe_refuses_bad_flags(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        _example("train_zero_compute_moe").main(argv)
    _one_line_exit_2(capsys, exc.value.code, needle)


@pytest.mark.parametrize("key,needle", [
    ("", "--out ''"), *[(f"OUT_{f}_{k}", name) for f, name in (("EP", "ep.json"), ("EP_PNG", "ep_timeline.png"))
                        for k in ("FIFO", "DEVNULL", "DIR")]])
def test_ep_refuses_an_output_file_that_is_not_regular_before_starting_ranks(capsys, paths, monkeypatch, key,
                                                                              needle):
    from mmkernels.distributed import launch

    monkeypatch.setattr(launch, "run_local_world", lambda *a, **k: pytest.fail("started ranks"))
    rc = bench_main(["ep", "--out", paths.get(key, key)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmkernels-bench ep: ") and needle in lines[0], err


def _broken_pyplot(monkeypatch):
    """matplotlib installed (find_spec finds it) but ``matplotlib.pyplot`` failing to import."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib installed (to be broken)")
@pytest.mark.parametrize("command", ["bench", "train_vlm"])
def test_plot_with_a_matplotlib_that_fails_to_import_is_refused_up_front(capsys, tmp_path, monkeypatch, command):
    _broken_pyplot(monkeypatch)
    if command == "bench":
        rc = bench_main(["expert_bias_update", "--quick", "--plot", "--out", str(tmp_path)])
    else:
        module = _example("train_vlm")
        monkeypatch.setattr(module, "train", lambda cfg: pytest.fail("trained with a broken matplotlib"))
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exc:
            module.main(["--plot", str(tmp_path / "c.png")])
        rc = exc.value.code
    _one_line_exit_2(capsys, rc, "--plot", "matplotlib")


# ---- the writers themselves: never open, block on or replace a special file ------------------------------------


def _special(tmp_path, kind):
    path = tmp_path / f"target_{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devnull":
        path.symlink_to("/dev/null")
    else:
        path.mkdir()
    return path


def _writers():
    """Every writer of an output file, as ``write(path)``: each goes through ``_args.replace_file``."""
    from mmkernels.bench import _args
    from mmkernels.bench.results import Row

    row = Row("op", "case", "fwd", "p", "cpu", "float32", 1.0, 0.9, 1.1, 3, None, None, None, None, None, 1.0, "p")

    def checkpoint(path):
        model = torch.nn.Linear(2, 2)
        _example("train_vlm").save_checkpoint(str(path), model, torch.optim.SGD(model.parameters(), lr=0.1), 1, [])

    def plot(path):
        _example("train_vlm").plot([{"step": 1, "loss": 1.0, "layers": [{"ffn_experts_per_token": 1.0,
                                                                          "max_over_mean_ffn_load": 1.0}]}], str(path))

    def speedups(path):
        from mmkernels.bench import plot as bench_plot

        old = bench_plot.plot_name
        bench_plot.plot_name = lambda op: path.name
        try:
            bench_plot.plot_speedups([row], path.parent)
        finally:
            bench_plot.plot_name = old

    writers = {"replace_file": lambda path: _args.replace_file(path, lambda tmp: open(tmp, "w").close()),
               "checkpoint": checkpoint}
    if HAS_MATPLOTLIB:
        writers |= {"train_vlm.plot": plot, "bench.plot_speedups": speedups}
    return writers


WRITERS = ["replace_file", "checkpoint", "train_vlm.plot", "bench.plot_speedups", "results.json", "results.csv"]


@pytest.mark.parametrize("kind", ["fifo", "devnull", "folder"])
@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_refuses_a_special_file_and_leaves_it_alone(tmp_path, writer, kind):
    from mmkernels.bench.results import Row, write_results

    if writer in ("train_vlm.plot", "bench.plot_speedups") and not HAS_MATPLOTLIB:
        pytest.skip("needs matplotlib")
    if writer.startswith("results."):
        path = _special(tmp_path, kind).rename(tmp_path / writer)
        row = Row("op", "c", "fwd", "p", "cpu", "float32", 1.0, 0.9, 1.1, 3, None, None, None, None, None, 1.0, "p")
        write = lambda p: write_results(p.parent, [row], {"device": "cpu"})  # noqa: E731
    else:
        path = _special(tmp_path, kind)
        write = _writers()[writer]
    before = os.lstat(path)
    with pytest.raises(OSError, match="not a regular file") as exc:
        write(path)
    assert str(path) in str(exc.value)
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # the same node, untouched
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []  # no temporary file left


def test_replace_file_replaces_a_regular_file_through_a_link_and_keeps_its_mode(tmp_path):
    from mmkernels.bench import _args

    real = tmp_path / "real.txt"
    real.write_text("old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    _args.replace_file(link, lambda tmp: Path(tmp).write_text("new"))
    assert link.is_symlink() and real.read_text() == "new" and (real.stat().st_mode & 0o777) == 0o640

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _args.replace_file(real, fail)
    assert real.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_open_log_never_blocks_on_a_fifo_or_writes_a_device(tmp_path, kind):
    from mmkernels.bench import _args

    path = _special(tmp_path, kind)
    before = os.lstat(path)
    with pytest.raises(OSError):  # a FIFO with no reader: ENXIO at once (O_NONBLOCK); a device: refused after open
        _args.open_log(path)
    assert (os.lstat(path).st_mode, os.lstat(path).st_ino) == (before.st_mode, before.st_ino)
    log = tmp_path / "log.jsonl"
    log.write_text("old\n")
    with _args.open_log(log) as f:
        f.write("new\n")
    assert log.read_text() == "new\n"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_train_vlm_writes_exactly_the_files_it_names_and_resumes(capsys, tmp_path, monkeypatch):
    """--plot without .png writes a PNG at exactly that path and prints it; --ckpt over an existing regular file is
    replaced; --resume of that checkpoint continues (read before anything is built)."""
    module = _example("train_vlm")
    monkeypatch.chdir(tmp_path)
    ckpt, curves, log = tmp_path / "ck.pt", tmp_path / "curves", tmp_path / "log.jsonl"
    ckpt.write_text("an old file")
    common = ["--batch", "4", "--no-progress", "--threads", "1", "--ckpt", str(ckpt), "--jsonl", str(log)]
    module.main(["--steps", "2", "--plot", str(curves), *common])
    out = capsys.readouterr().out
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "curves.png").exists()
    assert f"curves written to {curves}" in out
    assert module.read_checkpoint(str(ckpt))["step"] == 2
    module.main(["--steps", "3", "--resume", str(ckpt), *common])
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert module.read_checkpoint(str(ckpt))["step"] == 3


def test_train_vlm_resume_of_another_preset_is_one_line(capsys, tmp_path, monkeypatch):
    """A checkpoint of this script that does not fit the model the flags build: one line, exit 2, before training."""
    module = _example("train_vlm")
    model = torch.nn.Linear(2, 2)
    ckpt = tmp_path / "foreign.pt"
    module.save_checkpoint(str(ckpt), model, torch.optim.SGD(model.parameters(), lr=0.1), 1, [])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        module.main(["--steps", "2", "--resume", str(ckpt), "--no-progress", "--threads", "1"])
    _one_line_exit_2(capsys, exc.value.code, "--resume", "does not fit")


def test_train_vlm_ckpt_fifo_as_a_process(tmp_path):
    """The trial's command: a FIFO (or device) as --ckpt exits 2 with one line before training, the FIFO intact."""
    fifo = _fifo(tmp_path / "ck")
    out = _run(["examples/train_vlm.py", "--steps", "2", "--ckpt", fifo, "--jsonl", str(tmp_path / "l.jsonl")],
               timeout=120)
    assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ckpt" in lines[0] and "FIFO" in lines[0], out.stderr
    assert Path(fifo).is_fifo()


@pytest.mark.parametrize("kind", ["fifo", "devnull", "dir"])
def test_tune_refuses_the_device_file_in_an_out_folder_before_tuning(capsys, tmp_path, monkeypatch, kind):
    """``tune --out FOLDER`` writes FOLDER/<device>.json: once the card is known, that file is checked like every
    output file (here on a faked CUDA device; nothing is tuned)."""
    import mmkernels._env
    import mmkernels.bench.tune as tune_cli  # issue 20: tune() moved from the tuning core to the bench side
    from mmkernels.kernels.triton import tuning

    name = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("selected a device"))
    monkeypatch.setattr(mmkernels._env, "triton_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "device_name", lambda device=None: name)
    monkeypatch.setattr(tune_cli, "tune", lambda *a, **k: pytest.fail("tuned"))
    folder = _folder_with(tmp_path, "configs", f"{tuning.device_slug(name)}.json", kind)
    rc = bench_main(["tune", "attention", "--out", folder])
    _one_line_exit_2(capsys, rc, "--out", f"{tuning.device_slug(name)}.json", "not a regular file")


def test_bench_a_fifo_appearing_during_the_run_is_never_opened(capsys, tmp_path, monkeypatch):
    """The up-front check cannot see a FIFO made after it: the writer refuses it (no hang), the run ends with exit 1
    and a line naming the file, and the FIFO is left as it was."""
    from mmkernels.bench import cli

    real_run = cli.run_cases
    fifo = tmp_path / "results.json"

    def run_then_mkfifo(*args, **kwargs):
        if not fifo.exists():
            os.mkfifo(fifo)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(cli, "run_cases", run_then_mkfifo)
    rc = bench_main(["expert_bias_update", "--quick", "--warmup-ms", "1", "--rep-ms", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and fifo.is_fifo()
    assert f"FAILED writing --out {tmp_path}: {fifo} is a FIFO, not a regular file" in err, err
