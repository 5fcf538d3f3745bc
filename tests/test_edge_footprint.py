"""An edge client's memory (issue 21, item 6; figures: benchmarks/edge_footprint.py): the
processes that stay up between rounds import only what they need, and a training round
does not pull in scikit-learn through River."""

from __future__ import annotations

import json
import subprocess
import sys

from fedtide.deployment.supernode import runtime_api_address


def _imported_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {modules!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_client_supervisor_imports_neither_torch_numpy_rich_nor_flower():
    assert _imported_after("import fedtide.deployment.client_process", ("torch", "numpy", "rich", "flwr")) == []


def test_the_supernode_module_imports_no_training_code():
    assert _imported_after("import fedtide.deployment.supernode", ("torch", "numpy", "flwr", "client", "common")) == []


def test_drift_detectors_load_without_scikit_learn():
    statement = "from client.drift import DriftMonitor\nfor n in ('adwin', 'page-hinkley', 'ddm'): DriftMonitor(n)"
    assert _imported_after(statement, ("sklearn", "river.datasets")) == []


def test_the_superexec_asks_the_runtime_api_where_the_supernode_serves_it():
    assert runtime_api_address(["--superlink", "a:1", "--port", "4567"]) == "127.0.0.1:4567"
    assert runtime_api_address(["--host=::1", "--port=80"]) == "[::1]:80"
