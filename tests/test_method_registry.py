"""A new continual-learning method is one class: this file adds one, touching no other file,
and it works end to end: its flag and help, validation, training, a bench cell."""

from __future__ import annotations

import json

import pytest

from client.methods import Method
from common.config import RunConfig
from common.errors import FedtideError
from common.method_registry import register_method, unregister_method
from common.settings import Setting


class WeightShrink(Method):
    """A toy method: an L2 pull of every weight towards zero, strength ``--shrink-strength``."""

    name = "shrink"
    settings = (Setting("shrink-strength", float, 0.01, "shrink: L2 strength towards zero", minimum=0),)
    calls = 0  # penalties computed in this process, so the test sees the hook run

    def __init__(self, strength: float) -> None:
        self.strength = strength

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["shrink-strength"])

    def penalty(self, model, x, logits):
        WeightShrink.calls += 1
        return self.strength * sum((p**2).sum() for p in model.parameters())


@pytest.fixture
def shrink():
    register_method(WeightShrink)
    WeightShrink.calls = 0
    yield WeightShrink
    unregister_method("shrink")


def test_a_method_defined_in_one_file_gets_its_flag_help_and_validation(shrink, capsys):
    from fedtide.cli import build_parser, main

    args = build_parser().parse_args(["simulate", "--method", "replay+shrink", "--shrink-strength", "0.5"])
    assert args.method == "replay+shrink" and args.shrink_strength == 0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    assert "--shrink-strength" in capsys.readouterr().out
    assert RunConfig.of(method="shrink", shrink_strength=0.5).methods.options["shrink-strength"] == 0.5
    with pytest.raises(FedtideError, match="--shrink-strength must be >= 0"):
        RunConfig.of(method="shrink", shrink_strength=-1)
    assert RunConfig.of(method="replay", shrink_strength=0.5) == RunConfig.of(method="replay")  # unread
    assert main(["simulate", "--method", "naive", "--shrink-strength", "2", "--quiet"]) == 2
    assert "--shrink-strength is set but --method naive does not use it" in capsys.readouterr().err


def test_a_method_defined_in_one_file_trains_in_a_run(shrink, tmp_path):
    from fedtide.runtimes.inprocess import run_inprocess

    base = RunConfig.of(num_tasks=2, rounds_per_task=1, local_epochs=1, quiet=True)
    strong = run_inprocess(base.replace(method="shrink", shrink_strength=1.0, out=str(tmp_path / "strong")))
    assert shrink.calls > 0
    plain = run_inprocess(base.replace(method="naive", out=str(tmp_path / "plain")))
    from safetensors.torch import load_file

    def norm(run: str) -> float:
        return float(sum((t**2).sum() for t in load_file(str(tmp_path / run / "model.safetensors")).values()))

    assert norm("strong") < norm("plain")  # the penalty pulled the weights towards zero
    config = json.loads((tmp_path / "strong" / "config.json").read_text())
    assert config["method"] == "shrink" and config["shrink-strength"] == 1.0
    assert 0 <= strong["acc"] <= 1 and 0 <= plain["acc"] <= 1


def test_a_method_defined_in_one_file_is_a_bench_cell(shrink, tmp_path):
    from fedtide.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--scenario", "split-digits", "--methods", "naive,shrink", "--references", "none",
                 "--set", "rounds-per-task=1", "--set", "local-epochs=1", "--set", "num-tasks=2",
                 "--set", "shrink-strength=0.2", "--out", str(out)]) == 0
    cells = {json.loads(p.read_text())["label"]: json.loads(p.read_text())["config"] for p in out.glob("cells/*/cell.json")}
    assert cells["shrink"]["shrink-strength"] == 0.2
    assert cells["naive"]["shrink-strength"] == 0.01  # a cell keeps the default of a setting its method does not read
    assert "shrink" in (out / "summary.md").read_text()
