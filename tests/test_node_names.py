"""Human node names beside Flower's ids: in metrics.jsonl, the rejected replies, drift events,
log lines and the per-round line an operator reads in a log file."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from server.history import RoundRecord, RunHistory
from server.node_names import NODES_FILE, NodeNames
from server.progress import RoundProgress, round_line

ID_1, ID_2 = 6435071288605390923, 11


def _names(folder, nodes) -> NodeNames:
    (folder / NODES_FILE).write_text(json.dumps({"nodes": nodes}))
    return NodeNames(folder)


def test_records_name_each_node_beside_its_id(tmp_path):
    history = RunHistory(names=_names(tmp_path, {str(ID_1): "node-1"}))
    history.client_reply(ID_1, {"num-examples": 10, "drift-detected": 1, "task-id": 0})
    history.client_reply(ID_2, {"num-examples": 12})
    history.rejected_reply(1, ID_1, "client failed: timeout")
    record = history.close_round(1, [0.5], 3.0)
    assert [(c["node"], c.get("name")) for c in record.clients] == [(ID_1, "node-1"), (ID_2, None)]
    assert record.rejected == [{"round": 1, "node": ID_1, "name": "node-1", "reason": "client failed: timeout"}]
    assert history.drift_events[0]["name"] == "node-1"
    assert history.node_rejects().as_json()[str(ID_1)]["name"] == "node-1"
    assert history.label(ID_1) == f"node-1 ({ID_1})" and history.label(ID_2) == str(ID_2)


def test_a_name_registered_while_the_run_goes_on_is_picked_up(tmp_path):
    names = _names(tmp_path, {})
    assert names.name(ID_2) is None
    (tmp_path / NODES_FILE).write_text(json.dumps({"nodes": {str(ID_2): "node-2", "7": "node-7"}}))
    assert names.name(ID_2) == "node-2"


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"nodes": []}', '{"nodes": {"12": "../../etc"}}', '{"nodes": {"x": "node-1"}}',
    '{"nodes": {"12": "a\\nforged log line"}}', '{"nodes": {"12": 5}}', '{"nodes": {"1' + "0" * 30 + '": "n"}}',
])
def test_a_bad_nodes_file_only_means_ids_without_names(tmp_path, content):
    (tmp_path / NODES_FILE).write_text(content)
    assert NodeNames(tmp_path).name(12) is None


def test_a_huge_nodes_file_is_not_read(tmp_path):
    (tmp_path / NODES_FILE).write_text('{"nodes": {"12": "node-12"}}' + " " * (5 * 2**20))
    assert NodeNames(tmp_path).name(12) is None


def _record(**fields) -> RoundRecord:
    base = dict(server_round=3, task=0, task_accuracies=[0.812], train={"train-loss": 0.4123}, seconds=18.24,
                clients=[{"node": ID_1, "name": "node-1"}, {"node": ID_2, "name": "node-2"}])
    return RoundRecord(**{**base, **fields})


def test_a_round_line_says_who_replied_and_who_failed_by_name():
    line = round_line(_record(rejected=[{"round": 3, "node": 5, "name": "node-3", "reason": "timeout"}]), 20, 5)
    assert line == "round 3/20 | task 1/5 | 2 replied (node-1, node-2) | 1 failed (node-3) | acc 81.2% | loss 0.412 | 18.2 s"
    many = round_line(_record(clients=[{"node": i, "name": f"node-{i}"} for i in range(10)]), 20, 5)
    assert "10 replied (node-0, node-1, node-2, node-3, node-4, node-5, node-6, node-7, +2)" in many
    assert "| 2 replied |" in round_line(_record(clients=[{"node": 1}, {"node": 2}]), 20, 5)  # a simulation: no names


def test_output_that_is_not_a_terminal_gets_one_line_per_round_and_no_bar():
    out = io.StringIO()
    with RoundProgress(20, 5, quiet=False, console=Console(file=out, force_terminal=False)) as progress:
        progress.round_done(_record())
        progress.round_done(_record(server_round=4))
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["round 3/20", "round 4/20"]
