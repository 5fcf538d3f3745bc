"""`fedtide split-files` writes each client's stream as inbox files an edge client accepts."""

from __future__ import annotations

import torch

from client.inbox import parse_data_file
from common.config import RunConfig
from common.scenarios import build_scenario
from fedtide.cli import main


def test_split_files_writes_each_clients_tasks_in_order_and_the_inbox_reads_them_back(tmp_path, capsys):
    out = tmp_path / "parts"
    code = main(["split-files", "--to", str(out), "--clients", "2", "--num-tasks", "3", "--files-per-task", "2"])
    assert code == 0 and "for 2 clients" in capsys.readouterr().out
    scenario = build_scenario(*_scenario_args(RunConfig.of(clients=2, num_tasks=3)))
    for client in range(2):
        names = sorted(p.name for p in (out / f"client-{client + 1}").iterdir())
        assert names == ["t0-0.npz", "t0-1.npz", "t1-0.npz", "t1-1.npz", "t2-0.npz", "t2-1.npz"]
        for task in range(3):
            parts = [
                parse_data_file(n, (out / f"client-{client + 1}" / n).read_bytes(), scenario.input_shape, 10)
                for n in (f"t{task}-0.npz", f"t{task}-1.npz")
            ]
            expected = scenario.train_data(client, task)
            assert torch.equal(torch.cat([p.x for p in parts]), expected.x)
            assert torch.equal(torch.cat([p.y for p in parts]), expected.y)
            assert set(expected.y.tolist()) <= set(scenario.tasks[task].classes)  # class-incremental drift


def test_split_files_does_not_write_over_earlier_files(tmp_path, capsys):
    out = tmp_path / "parts"
    assert main(["split-files", "--to", str(out), "--clients", "2"]) == 0
    assert main(["split-files", "--to", str(out), "--clients", "2"]) == 2
    assert "--force" in capsys.readouterr().err


def _scenario_args(config):
    return config.data, config.seed
