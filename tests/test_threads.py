"""torch's OpenMP threads wait passively under fedtide, unless the user chose otherwise."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _policy_after(statement: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"{statement}\nimport os\nprint(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_fedtide_chooses_passive_waiting_before_torch_loads():
    assert _policy_after("import client.app\nimport torch") == "PASSIVE"


def test_a_users_choice_stands_and_a_torch_loaded_first_is_left_alone():
    assert _policy_after("import client.app", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert _policy_after("import torch\nimport client.app") == "unset"  # too late to matter: nothing is set


def test_threads_given_on_the_command_line_are_the_runs_and_the_callers_setting_comes_back(tmp_path, capsys):
    import json

    import torch

    from fedtide.cli import main

    before = torch.get_num_threads()
    tiny = ["--num-tasks", "1", "--rounds-per-task", "1", "--local-epochs", "1", "--quiet"]
    assert main(["simulate", "--threads", "1", "--out", str(tmp_path / "run"), *tiny]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["threads"] == 1
    assert torch.get_num_threads() == before
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "naive", "--references", "none", "--threads", "1", "--out", str(out),
                 "--set", "num-tasks=1", "--set", "rounds-per-task=1", "--set", "local-epochs=1"]) == 0
    assert json.loads((out / "cells" / "naive-s0" / "cell.json").read_text())["summary"]["threads"] == 1
    assert torch.get_num_threads() == before
    capsys.readouterr()
    for command in (["simulate", *tiny], ["bench"]):
        assert main([*command, "--threads", "0", "--out", str(tmp_path / "bad")]) == 2
        assert "--threads must be between 1 and 1024 (got 0)" in capsys.readouterr().err
