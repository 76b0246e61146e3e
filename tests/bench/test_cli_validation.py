"""Every ``mmkernels-bench`` subcommand (but ``ep``, tested with its own CLI), ``python -m mmkernels.info`` and the
examples refuse every bad flag value and every bad ``MMKERNELS_*`` variable before any work: exit status 2, exactly one
line on stderr naming the flag or variable, nothing on stdout (a run prints its header only once it starts work).

Run in-process through each ``main(argv)`` (fast); a few cases also through the real entry points as subprocesses.
"""

from __future__ import annotations

import importlib.util
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


@pytest.fixture
def paths(tmp_path):
    """A regular file, a FIFO and a path under /proc (cannot be created) to pass where a folder or file is wanted."""
    regular = tmp_path / "a_file"
    regular.write_text("x")
    fifo = tmp_path / "a_fifo"
    os.mkfifo(fifo)
    return {"FILE": str(regular), "FIFO": str(fifo), "PROC": "/proc/mmkernels_no_such_dir/x"}


def _expand(argv, paths):
    return [paths.get(a, a) for a in argv]


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
]
HF = [
    (["hf"], "--model"),
    (["hf", "--model", "bogus"], "--model"),
    (["hf", "--model", "vit", "--device", "bogus"], "--device"),
    (["hf", "--model", "vit", "--device", "mps"], "--device"),
    (["hf", "--model", "vit", "--backend", "bogus"], "--backend"),
    (["hf", "--model", "vit", "--backend", "cpp"], "--backend"),
    (["hf", "--model", "mixtral-moe", "--backend", "triton"], "--backend"),
    (["hf", "--model", "vit", "--out", "FILE"], "--out"),
    (["hf", "--model", "vit", "--out", "PROC"], "--out"),
    (["hf", "--model", "vit", "--rep-ms", "nan"], "--rep-ms"),
    (["hf", "--model", "vit", "--warmup-ms", "-1"], "--warmup-ms"),
    (["hf", "--model", "vit", "--threads", "0"], "--threads"),
    (["hf", "--model", "vit", "--size", "huge"], "--size"),
    (["hf", "--model", "vit", "--dtype", "fp64"], "--dtype"),
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
])
def test_train_vlm_refuses_bad_flags_before_training(capsys, paths, monkeypatch, argv, needle):
    module = _example("train_vlm")
    monkeypatch.setattr(module, "train", lambda cfg: pytest.fail("trained with a bad flag"))
    if needle.startswith("--plot needs"):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec answers None: not installed
    with pytest.raises(SystemExit) as exc:
        module.main(_expand(argv, paths))
    _one_line_exit_2(capsys, exc.value.code, needle)


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "0"], "--steps"), (["--tokens", "x"], "--tokens"), (["--device", "bogus"], "--device"),
    (["--threads", "-1"], "--threads"),
])
def test_train_zero_compute_moe_refuses_bad_flags(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        _example("train_zero_compute_moe").main(argv)
    _one_line_exit_2(capsys, exc.value.code, needle)
