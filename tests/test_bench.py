"""`fedtide bench`: methods and references on the same splits, one table, resumable."""

import csv
import json

from fedtide.cli import main

TINY = ["--set", "rounds-per-task=1", "--set", "local-epochs=1", "--set", "num-tasks=2"]


def test_small_bench_writes_its_table_and_resumes_without_redoing_cells(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--methods", "naive,replay", "--seeds", "2", "--out", str(out), *TINY]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["label"] for r in rows] == ["naive", "replay", "local-only", "fed-joint", "central-joint"]
    assert all(r["seeds"] == "2" for r in rows)
    assert (out / "summary.md").read_text().count("\n|") >= 6
    assert (out / "summary.svg").stat().st_size > 0
    cells = list(csv.DictReader((out / "cells.csv").open()))
    assert len(cells) == 10
    # each cell records the settings it ran with, which is what resuming compares
    first = json.loads((out / "cells" / "naive-s0" / "cell.json").read_text())
    assert first["config"]["seed"] == 0 and first["config"]["method"] == "naive"

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")}
    capsys.readouterr()
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")} == stamps
    assert "already done" in capsys.readouterr().err


def test_a_changed_setting_reruns_the_cell(tmp_path):
    out = tmp_path / "bench"
    base = ["bench", "--methods", "naive", "--references", "none", "--out", str(out), *TINY]
    assert main(base) == 0
    before = json.loads((out / "cells" / "naive-s0" / "cell.json").read_text())
    assert main(base + ["--set", "lr=0.05"]) == 0
    after = json.loads((out / "cells" / "naive-s0" / "cell.json").read_text())
    assert before["config"]["lr"] != after["config"]["lr"] == 0.05


def test_joint_references_beat_sequential_naive_training(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "naive", "--references", "fed-joint,central-joint", "--out", str(out),
                 "--set", "rounds-per-task=2", "--set", "local-epochs=2"]) == 0
    acc = {r["label"]: float(r["ACC % mean"]) for r in csv.DictReader((out / "summary.csv").open())}
    assert acc["central-joint"] > acc["naive"] + 50
    assert acc["fed-joint"] > acc["naive"] + 50
    # the bench says how far the best method is from each upper bound
    gap = f"{acc['fed-joint'] - acc['naive']:.2f} points below fed-joint"
    assert gap in capsys.readouterr().err
    assert gap in (out / "summary.md").read_text()


def test_memory_settings_apply_only_to_methods_with_a_memory(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "naive,der", "--references", "fed-joint", "--out", str(out), *TINY,
                 "--set", "memory-size=30", "--set", "replay-shift=1"]) == 0
    config = {c: json.loads((out / "cells" / f"{c}-s0" / "cell.json").read_text())["config"]
              for c in ("naive", "der", "fed-joint")}
    assert config["der"]["replay-shift"] == 1 and config["der"]["memory-size"] == 30
    assert config["naive"]["replay-shift"] == 0 and config["naive"]["memory-size"] == 200  # the defaults
    assert config["fed-joint"]["replay-shift"] == 0

    # a setting only der reads reruns only der's cell
    stamps = {c: (out / "cells" / f"{c}-s0" / "cell.json").stat().st_mtime_ns for c in config}
    assert main(["bench", "--methods", "naive,der", "--references", "fed-joint", "--out", str(out), *TINY,
                 "--set", "memory-size=30", "--set", "replay-shift=1", "--set", "der-alpha=0.3"]) == 0
    rerun = {c for c in config if (out / "cells" / f"{c}-s0" / "cell.json").stat().st_mtime_ns != stamps[c]}
    assert rerun == {"der"}


def test_bad_bench_input_is_one_line(tmp_path, capsys):
    assert main(["bench", "--scenario", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown scenario preset 'nope'" in capsys.readouterr().err
    assert main(["bench", "--references", "oracle", "--out", str(tmp_path)]) == 2
    assert "unknown reference 'oracle'" in capsys.readouterr().err
    assert main(["bench", "--methods", "naive,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert main(["bench", "--trainings", "federated,magic", "--out", str(tmp_path)]) == 2
    assert "unknown training 'magic' in --trainings" in capsys.readouterr().err
    assert main(["bench", "--trainings", "cluster-oracle", "--out", str(tmp_path)]) == 2
    assert "cluster-oracle knows each client's concept only" in capsys.readouterr().err


def test_each_method_runs_each_way_of_training_and_the_table_compares_them_with_the_oracle(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "naive", "--references", "none", "--out", str(out), *TINY,
                 "--set", "scenario=distributed-drift", "--set", "concept-switches=1", "--set", "clients=4",
                 "--trainings", "federated,clustered,cluster-oracle"]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["label"] for r in rows] == ["naive", "naive/clustered", "naive/cluster-oracle"]
    assert all(0 < float(r["served acc % mean"]) <= 100 for r in rows)
    assert "naive/clustered: served accuracy" in capsys.readouterr().err
    cell = json.loads((out / "cells" / "naive-clustered-s0" / "cell.json").read_text())
    assert cell["config"]["training"] == "clustered"


def test_the_references_of_an_asynchronous_preset_train_in_rounds(tmp_path):
    from common.config import RunConfig
    from fedtide.bench import _reference

    base = RunConfig.of(buffer_size=2, clients=5)
    assert _reference(base, "fed-joint", "replay", None).server.buffer_size == 0
    assert _reference(base, "local-only", "replay", None).server.buffer_size == 0


def test_bench_without_its_data_stops_before_any_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDTIDE_DATA_DIR", raising=False)
    out = tmp_path / "bench"
    assert main(["bench", "--scenario", "split-mnist", "--out", str(out)]) == 2
    assert "fedtide download mnist" in capsys.readouterr().err
    assert not out.exists()


def test_cells_run_in_parallel_processes_with_jobs(tmp_path):
    # each cell's settings cross to a spawned process: they must survive pickling as they are
    import pickle

    from common.config import RunConfig

    config = RunConfig.of(method="replay+ewc", memory_size=50, ewc_lambda=3.0)
    assert pickle.loads(pickle.dumps(config)) == config
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "naive,replay", "--references", "none", "--jobs", "2", "--out", str(out),
                 *TINY]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["label"] for r in rows] == ["naive", "replay"]
