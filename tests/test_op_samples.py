"""tests/op_samples.py: the central sweeps take every op's valid call from the op's own test file.

A new op family needs one test file (issue 20): a registered op without a sample, a sample declared twice or naming no
op, and a test file that cannot be imported each give one clear problem line, and the sweeps still collect.
"""

from __future__ import annotations

import textwrap

import op_samples  # tests/op_samples.py
import pytest
import torch

from mmkernels._backends import registered_ops


def test_every_registered_op_declares_a_sample():
    op_samples.check()
    assert set(op_samples.ops()) == set(registered_ops())
    assert "attention[varlen]" in op_samples.calls()


def _folder(tmp_path, files: dict[str, str]):
    folder = tmp_path / "ops"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_each_kind_of_problem_is_one_clear_line(tmp_path):
    folder = _folder(tmp_path, {
        "test_a.py": """
            SAMPLES = {"attention": lambda r: {}, "atention": lambda r: {}, "patch_embed": 3}
            USAGE_SAMPLES = {"attention": lambda r: None}
        """,
        "test_b.py": """
            SAMPLES = {"attention": lambda r: {}, "attention[varlen]": lambda r: {}}
            USAGE_SAMPLES = ["not a dict"]
        """,
        "test_c.py": "raise ImportError('boom')\n",
        "test_d.py": "X = 1\n",  # a test file without samples is fine
        "test_e.py": "import pytest\npytest.skip('no frobnicator', allow_module_level=True)\n",
    })
    samples, usage, where, problems = op_samples.collect(folder)
    assert set(samples) == {"attention", "attention[varlen]"} and set(usage) == {"attention"}
    assert where["SAMPLES['attention']"] == "tests/ops/test_a.py"
    expected = {
        "SAMPLES['atention'] in tests/ops/test_a.py names no registered op",
        "SAMPLES['patch_embed'] in tests/ops/test_a.py must be a function of r, got int",
        "SAMPLES['attention'] is declared twice: in tests/ops/test_a.py and in tests/ops/test_b.py",
        "tests/ops/test_b.py: USAGE_SAMPLES must be a dict of name -> lambda r: ..., got list",
        "tests/ops/test_c.py could not be imported for its samples: ImportError: boom",
    }
    for line in expected:
        assert sum(p.startswith(line) for p in problems) == 1, (line, problems)
    missing = {p.split("'")[1] for p in problems if p.startswith("op '")}
    assert missing == set(registered_ops()) - {"attention"}
    for op in missing:
        line = next(p for p in problems if p.startswith(f"op {op!r}"))
        assert f"declare SAMPLES = {{{op!r}: lambda r: dict(<every argument by name>)}}" in line, line
        assert "tests/ops/test_<name>.py" in line, line
        assert line.endswith("; tests/ops/test_e.py skips itself here: no frobnicator"), line
    assert len(problems) == len(expected) + len(missing)


def test_a_missing_sample_fails_one_test_not_the_collection(tmp_path, monkeypatch):
    """The sweeps' parametrizations leave out an op without a sample; check() (called by the one test in each sweep)
    names it."""
    monkeypatch.setattr(op_samples, "_CACHE", op_samples.collect(_folder(tmp_path, {
        "test_x.py": """
            SAMPLES = {"patch_embed": lambda r: dict(pixels=r(1, 3, 4, 4), weight=r(5, 3, 2, 2, seed=1))}
        """})))
    assert op_samples.calls() == op_samples.ops() == ["patch_embed"]
    with pytest.raises(AssertionError, match=r"op 'attention' has no valid call for the central sweeps"):
        op_samples.check()
    with pytest.raises(AssertionError, match=r"no valid call for 'moe_route': declare SAMPLES"):
        op_samples.good_args("moe_route")
    fn, args, kwargs = op_samples.usage("patch_embed")  # no USAGE_SAMPLES: derived from SAMPLES
    assert [tuple(a.shape) for a in args] == [(1, 3, 4, 4), (5, 3, 2, 2)] and kwargs == {}


def _by_name(fn, args, kwargs) -> dict:
    import inspect

    return inspect.signature(fn).bind(*args, **kwargs).arguments


@pytest.mark.parametrize("op", op_samples.ops())
def test_derived_usage_is_the_sample_called_by_name(op):
    """The fallback of an op without USAGE_SAMPLES, on every op: leading tensors positionally, the rest by name, the
    same arguments and the same result as the sample called by name (reference backend)."""
    fn, args, kwargs = op_samples.derived_usage(op)
    assert all(isinstance(a, torch.Tensor) for a in args)
    bound = _by_name(fn, args, kwargs)
    good = op_samples.good_args(op)
    assert list(bound) == list(good)
    for name, value in good.items():
        got = bound[name]
        leaves = torch.utils._pytree.tree_leaves((value, got))
        assert type(got) is type(value), name
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value), name
        elif not any(isinstance(x, torch.Tensor) for x in leaves):
            assert got == value, name
    positional = fn(*args, **kwargs, backend="reference")
    named = fn(**good, backend="reference")
    after_positional = _by_name(fn, args, kwargs)  # in-place ops: the arguments they updated, too
    for a, b in zip(torch.utils._pytree.tree_leaves((positional, after_positional)),
                    torch.utils._pytree.tree_leaves((named, good)), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), op
