"""One run at a time in a run folder, and a new run never mixes with an old one's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import RunConfig
from common.errors import FedtideError
from fedtide.cli import main
from fedtide.runtimes.inprocess import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-tasks", "2", "--rounds-per-task", "1", "--local-epochs", "1", "--quiet"]
TINY = RunConfig.of(num_tasks=2, rounds_per_task=1, local_epochs=1, quiet=True)
HOLD = "import sys, time; from server.run_lock import hold_run_folder\n" \
       "with hold_run_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)"


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (as a running fedtide would), until killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtide: error:") and "\n" not in err, err
    return err


def test_a_run_folder_in_use_is_refused_naming_the_holder_and_freed_when_it_is_killed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["simulate", "--out", str(run), *FAST]) == 0
    (run / "summary.json").unlink()  # an unfinished run: --resume would go on with it
    holder = _holder(run)
    try:
        assert main(["simulate", "--resume", str(run)]) == 2
        err = _one_line(capsys)
        assert str(run) in err and f"pid {holder.pid}" in err
        assert main(["simulate", "--out", str(run), "--force", *FAST]) == 2
        assert f"pid {holder.pid}" in _one_line(capsys)
        with pytest.raises(FedtideError, match=f"pid {holder.pid}"):  # the ServerApp's way in
            run_inprocess(TINY.replace(out=str(run)), resume=True)
        assert not (run / "summary.json").exists()
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process, nothing stale is left
        holder.wait()
    assert main(["simulate", "--resume", str(run)]) == 0
    assert (run / "summary.json").is_file()


@pytest.mark.slow
def test_two_resumes_at_once_run_each_round_once(tmp_path):
    run = tmp_path / "run"
    settings = ["--num-tasks", "3", "--rounds-per-task", "4", "--local-epochs", "1", "--quiet"]
    assert main(["simulate", "--out", str(run), *settings]) == 0
    for name in ("summary.json", "model.safetensors"):
        (run / name).unlink()
    checkpoints = run / "checkpoints"
    for round_ in (12, 11):  # back to round 10: two rounds left to run
        for suffix in (".json", ".safetensors"):
            (checkpoints / f"round-{round_:06d}{suffix}").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "fedtide.cli", "simulate", "--resume", str(run)]
    processes = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert sorted(code for code, _ in results) in ([0, 2, 2], [0, 0, 2], [0, 0, 0])  # later ones may find it done
    assert all("is in use by another fedtide run" in err for code, err in results if code == 2)
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 13))


def test_out_naming_a_run_is_refused_unless_forced_and_force_leaves_nothing_stale(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["simulate", "--out", str(run), *FAST]) == 0
    (run / "drift_events.jsonl").write_text('{"round": 1}\n')  # as an older run with drift would leave
    (run / "superlink.log").write_text("an old server's log\n")
    (run / ".summary.json.abc123.tmp").write_text("left by a killed write")
    (run / "notes.txt").write_text("the user's own")
    files = lambda: {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}  # noqa: E731
    before = files()
    assert main(["simulate", "--out", str(run), "--drift-detector", "none", *FAST]) == 2
    err = _one_line(capsys)
    assert "already holds a run" in err and "--force" in err and f"--resume {run}" in err
    assert files() == before
    assert main(["simulate", "--out", str(run), "--force", "--resume", str(run)]) == 2
    assert "drop one of them" in _one_line(capsys)
    assert main(["simulate", "--out", str(run), "--force", "--drift-detector", "none", *FAST]) == 0
    names = {p.name for p in run.iterdir()}
    assert "drift_events.jsonl" not in names and "superlink.log" not in names and ".summary.json.abc123.tmp" not in names
    assert (run / "notes.txt").read_text() == "the user's own"
    assert json.loads((run / "summary.json").read_text())["drift_events"] == 0
    assert json.loads((run / "config.json").read_text())["drift-detector"] == "none"


def test_an_unfinished_run_is_a_run_too(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["simulate", "--out", str(run), *FAST]) == 0
    for name in ("summary.json", "model.safetensors", "metrics.jsonl", "config.json"):
        (run / name).unlink()  # only its checkpoints are left
    assert main(["simulate", "--out", str(run), *FAST]) == 2
    assert "already holds a run" in _one_line(capsys)


def test_a_folder_without_a_run_takes_a_new_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's own")
    assert main(["simulate", "--out", str(run), *FAST]) == 0
    assert (run / "notes.txt").is_file() and (run / "summary.json").is_file()


def test_a_new_run_through_the_api_removes_an_older_runs_results(tmp_path):
    """A bench re-runs a cell in its folder: no result of the older run may stay beside the new one's."""
    (tmp_path / "drift_events.jsonl").write_text('{"round": 1}\n')
    (tmp_path / "rejected_replies.jsonl").write_text('{"round": 1}\n')
    run_inprocess(TINY.replace(out=str(tmp_path), drift_detector="none"))
    assert not (tmp_path / "drift_events.jsonl").exists() and not (tmp_path / "rejected_replies.jsonl").exists()
