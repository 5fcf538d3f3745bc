"""`fedtide client`'s supervisor on its own, with stand-in SuperNodes: it says why a revoked
node stops, and ends with the run once the run is over and the server gone."""

from __future__ import annotations

import os
import sys

import pytest

from common.errors import FedtideError
from common.receipt import RUN_FINISHED_FILE, Receipt
from fedtide.deployment.client_process import REVOKED_HINT, RunEnd, _node_name, _supervise


def _supernode(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_a_node_whose_key_the_server_revoked_is_told_so_not_stopped_silently():
    revoked = _supernode("print(\"httpx.HTTPStatusError: Client error '401 Unauthorized' for url "
                         "'https://127.0.0.1:9092/v1/fleet/send-node-heartbeat'\")")
    with pytest.raises(FedtideError) as raised:
        _supervise(revoked, dict(os.environ), max_wait=5)
    assert str(raised.value) == REVOKED_HINT and "--add-node" in REVOKED_HINT


def test_the_client_ends_with_the_run_once_its_last_round_is_trained_and_the_server_is_gone(tmp_path, capsys):
    gone = _supernode("import time\nwhile True:\n    print('WARNING: Connection attempt failed, retrying in 1.00 "
                      "seconds', flush=True); time.sleep(0.2)")
    (tmp_path / RUN_FINISHED_FILE).write_text("a" * 32)
    assert _supervise(gone, dict(os.environ), max_wait=None, run_end=RunEnd(tmp_path, grace=1.0)) == 0
    assert "the run is over" in capsys.readouterr().err


def test_a_server_that_comes_back_in_time_or_a_run_not_over_keeps_the_client(tmp_path):
    run_end = RunEnd(tmp_path, grace=0.0)
    run_end.saw("WARNING: Connection attempt failed, retrying in 1.00 seconds")
    assert not run_end.over()  # no last round trained yet: the server may be resuming
    (tmp_path / RUN_FINISHED_FILE).write_text("a" * 32)
    assert run_end.over()
    run_end.saw("INFO: Connection successful after 3.10 seconds and 2 tries.")
    assert not run_end.over()  # it came back (a resumed server redoing the last round)


def test_the_last_round_leaves_the_marker_and_any_other_round_takes_it_away(tmp_path):
    from client.state_store import ClientStateStore

    store = ClientStateStore(tmp_path)
    store.note_run_end(Receipt("a" * 32, 3, last_round=4), 4)
    assert (tmp_path / RUN_FINISHED_FILE).read_text().strip() == "a" * 32
    store.note_run_end(Receipt("a" * 32, 3, last_round=4), 3)  # a resumed run redoing an earlier round
    assert not (tmp_path / RUN_FINISHED_FILE).exists()
    store.note_run_end(Receipt("a" * 32, 3), 9)  # a server that does not say its last round
    assert not (tmp_path / RUN_FINISHED_FILE).exists()


@pytest.mark.parametrize("key, name", [("node-3.key", "node-3"), ("gate-7.key", "gate-7"),
                                       ("../x y.key", "node"), ("n\u00e9.key", "node"), ("a" * 80 + ".key", "node")])
def test_a_node_is_named_after_its_key_file_when_the_name_is_safe(key, name, tmp_path):
    assert _node_name(tmp_path / key) == name
