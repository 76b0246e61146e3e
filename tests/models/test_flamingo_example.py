"""examples/flamingo_stack.py: the tiny Flamingo stack (ViT -> PerceiverResampler -> GatedCrossAttentionBlocks
interleaved with ScMoE decoder layers) trains on CPU in seconds and its loss falls below what a model blind to the
images can reach, so the vision path through the gated cross-attention works; bad flags exit with status 2."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flamingo_stack.py"


def _example():
    key = "_mmkernels_example_flamingo_stack"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLE)
        module = sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture
def one_thread(cpu_threads):
    """The example's CPU setting (main() sets it): two threads on a busy 2-core machine run several times slower."""
    cpu_threads(1)


def test_loss_goes_down_below_the_blind_bound(one_thread):
    lines = []
    losses = _example().train(60, log=lines.append)
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    # a decoder that ignores the images predicts each <colour> token at chance: mean loss >= 2 log(3) / 7 per token
    blind = 2 * math.log(3) / 7
    assert sum(losses[-5:]) / 5 < 0.8 * blind, losses[-5:]
    assert lines[0].startswith("step    1") and "colour accuracy" in lines[-1]


@pytest.mark.parametrize("argv,needle", [(["--steps", "0"], "--steps"), (["--lr", "nan"], "--lr"),
                                         (["--backend", "bogus"], "--backend"), (["--device", "bogus"], "--device")])
def test_bad_flags_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        _example().main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
