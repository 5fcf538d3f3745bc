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
