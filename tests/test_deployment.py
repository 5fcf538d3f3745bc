"""Deployment end to end on loopback: `fedtide certs`, then `fedtide server` (SuperLink with
TLS and node authentication) and two `fedtide client` processes (SuperNodes), all real
processes. A data file dropped mid-run is trained on in a later round; a client killed
with SIGKILL in the middle of a round lets that round finish within its timeout with the
other client, and once restarted keeps its replay memory and ledger; a node whose key was
not registered is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedtide.cli import main
from loopback import Session, digits_arrays, drop_file, free_port, read_ledger, read_state, wait_for

pytestmark = pytest.mark.slow

ROUNDS = 5  # after the kill in round 2, rounds enough for the SuperLink to let the old session expire
SAMPLES = (150, 120)  # per client: tells their replies apart
ROUND_TIMEOUT = 45  # the longest a round waits; it ends as soon as both replied or failed



def kept_samples(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every sample replay keeps: its memory's, then its stage's (the running task's)."""
    return torch.cat([state[k] for k in ("replay.x", "replay.stage.x") if k in state])

def _completed_rounds(run) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_server_and_two_clients_learn_from_arriving_files_and_survive_a_client_kill(tmp_path):
    certs, stranger = tmp_path / "certs", tmp_path / "stranger"
    assert main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", "2"]) == 0
    assert main(["certs", "--out", str(stranger), "--server-name", "localhost", "--nodes", "1"]) == 0
    data = [tmp_path / "data-1", tmp_path / "data-2"]
    state = [tmp_path / "state-1", tmp_path / "state-2"]
    for i, folder in enumerate(data):
        drop_file(folder, "batch-0.npz", *digits_arrays(seed=i, count=SAMPLES[i]))
    run = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"

    def client(i: int, log: str) -> Session:
        return Session(
            ["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"node-{i + 1}.key"),
             "--data", str(data[i]), "--state", str(state[i])],
            tmp_path / log, tmp_path,
        )

    sessions: list[Session] = []
    try:
        server = Session(
            ["server", "--certs", str(certs), "--database", str(tmp_path / "superlink.db"), "--out", str(run),
             "--address", address, "--num-tasks", "1", "--rounds-per-task", str(ROUNDS), "--local-epochs", "1",
             "--round-timeout", str(ROUND_TIMEOUT)],
            tmp_path / "server.log", tmp_path,
        )
        sessions.append(server)
        sessions += [client(0, "client-1.log"), client(1, "client-2.log")]
        intruder = Session(
            ["client", "--server", address, "--certs", str(certs), "--node-key", str(stranger / "node-1.key"),
             "--data", str(tmp_path / "data-x"), "--state", str(tmp_path / "state-x"), "--max-wait", "20"],
            tmp_path / "intruder.log", tmp_path,
        )
        sessions.append(intruder)

        # a new file arrives at client 1 while the run goes on
        wait_for(lambda: _completed_rounds(run) >= 1, 180, "round 1")
        drop_file(data[0], "batch-1.npz", *digits_arrays(seed=7, count=SAMPLES[0]))
        memory_before = kept_samples(read_state(state[1])).clone()
        # client 2 is training round 2: kill it outright, then start it again on the same state
        wait_for(lambda: not sessions[2].running_clientapp(), 60, "client 2's round 1 to end", every=0.1)
        wait_for(sessions[2].running_clientapp, 120, "client 2 training round 2", every=0.1)
        sessions[2].kill()
        sessions.append(client(1, "client-2-restarted.log"))

        assert server.wait(timeout=300) == 0, server.output()[-3000:]
        assert intruder.wait(timeout=60) != 0
    finally:
        for session in sessions:
            session.kill()

    assert "refused" in intruder.output()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    for name in ("summary.json", "model.safetensors", "accuracy.svg", "config.json"):
        assert (run / name).is_file()

    ledger_1 = {entry["name"]: entry for entry in read_ledger(state[0])}
    assert sorted(ledger_1) == ["batch-0.npz", "batch-1.npz"]  # each file consumed exactly once
    assert ledger_1["batch-0.npz"]["round"] == 1
    assert ledger_1["batch-1.npz"]["round"] > 1  # dropped mid-run, trained on in a later round
    # the round in which client 2 died went on with client 1's reply alone, once the SuperLink
    # missed client 2's heartbeats (seconds) or at the latest at its timeout
    assert [c["num-examples"] for c in lines[1]["clients"]] == [SAMPLES[0]]
    assert lines[1]["seconds"] <= ROUND_TIMEOUT + 25
    # every record names its node (node-1, node-2: the key files) beside Flower's id
    assert {c["name"] for line in lines for c in line["clients"]} == {"node-1", "node-2"}
    assert [r.get("name") for r in lines[1]["rejected"]] in ([], ["node-2"])  # lost (named) or timed out
    assert "round 2/5 | task 1/1 | 1 replied (node-1)" in server.output()  # one line per round in a log file

    ledger_2 = read_ledger(state[1])
    assert [(e["name"], e["round"]) for e in ledger_2] == [("batch-0.npz", 1)]  # not consumed again after the restart
    after = read_state(state[1])
    assert int(after["replay.seen"]) + int(after.get("replay.stage.seen", 0)) == SAMPLES[1]
    assert torch.equal(kept_samples(after), memory_before)  # the memory survived the SIGKILL
    trained_after_restart = [
        line["round"] for line in lines[2:] if any(c["num-examples"] == SAMPLES[1] for c in line["clients"])
    ]
    # back within a round: its killed session expires within 20 s (see fedtide.deployment.supernode)
    assert trained_after_restart and trained_after_restart[0] <= 4, trained_after_restart


def test_a_server_whose_clients_never_come_stops_with_a_clear_message(tmp_path):
    server = Session(
        ["server", "--insecure", "--clients", "1", "--client-wait", "3", "--num-tasks", "1", "--rounds-per-task", "1",
         "--database", str(tmp_path / "db"), "--out", str(tmp_path / "run"), "--address", f"127.0.0.1:{free_port()}"],
        tmp_path / "server.log", tmp_path,
    )
    try:
        assert server.wait(timeout=120) == 2
    finally:
        server.kill()
    last = server.output().strip().splitlines()[-1]
    assert last.startswith("fedtide: error: only 0 of the 1 clients a round needs connected within 3 s")


def test_a_server_killed_mid_run_resumes_with_its_clients_and_loses_no_round_and_no_sample(tmp_path):
    """SIGKILL of the server after a client trained on a new file in a round the server had not
    kept yet: after --resume that round is redone, the client trains on the file again, and
    every sample of every file a client consumed reaches exactly one kept round. Client 2's
    training of that round hangs meanwhile (SIGSTOP, then SIGKILL), so that the killed round
    cannot finish first; Flower's SuperNode takes its ClientApp for dead only when the task's
    heartbeats expire (a minute or more), so client 2 may miss the redone round."""
    import signal

    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", "2"]) == 0
    sizes = {1: (100, 77), 2: (100, 66)}  # per client: batch-0, batch-1 (dropped mid-run)
    for i in (1, 2):
        drop_file(tmp_path / f"data-{i}", "batch-0.npz", *digits_arrays(seed=i, count=sizes[i][0]))
    run, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    where = ["--certs", str(certs), "--database", str(tmp_path / "superlink.db"), "--address", address]
    sessions = []
    try:
        # a round waits for the replies of both clients (after the resume: until they reconnected
        # and installed the resumed run, seconds or more on a busy machine)
        server = Session(["server", *where, "--out", str(run), "--num-tasks", "1", "--rounds-per-task", "4",
                          "--local-epochs", "1", "--round-timeout", "90"], tmp_path / "server.log", tmp_path)
        sessions.append(server)
        for i in (1, 2):
            sessions.append(Session(
                ["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"node-{i}.key"),
                 "--data", str(tmp_path / f"data-{i}"), "--state", str(tmp_path / f"state-{i}")],
                tmp_path / f"client-{i}.log", tmp_path,
            ))
        client_1, client_2 = sessions[1], sessions[2]
        wait_for(lambda: "round 3:" in client_1.output(), 300, "client 1 to train round 3")
        for i in (1, 2):
            drop_file(tmp_path / f"data-{i}", "batch-1.npz", *digits_arrays(seed=10 + i, count=sizes[i][1]))
        wait_for(lambda: _completed_rounds(run) >= 3, 240, "round 3")
        # client 2's training of round 4 hangs; client 1 trains round 4 on its new file
        wait_for(lambda: client_2.output().count("Start `flwr-clientapp` process") >= 4
                 and client_2.signal_clientapps(signal.SIGSTOP), 120, "client 2 to train round 4", every=0.05)
        wait_for(lambda: "round 4: 1 new file(s)" in client_1.output(), 120, "client 1 to train round 4 on its file")
        server.kill_command_only()  # kill -9 of `fedtide server` alone: its SuperLink must not outlive it
        done_before = _completed_rounds(run)
        wait_for(lambda: not server.alive("flower-superlink"), 20, "the orphaned SuperLink to stop")
        client_2.signal_clientapps(signal.SIGKILL)  # the hung training ends; its SuperNode stays
        resumed = Session(["server", "--resume", str(run), *where], tmp_path / "resumed.log", tmp_path)
        sessions.append(resumed)
        assert resumed.wait(timeout=300) == 0, resumed.output()[-3000:]
    finally:
        for session in sessions:
            session.kill()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3, 4]  # none lost, none twice
    assert done_before == 3
    assert client_1.output().count("round 4: 1 new file(s)") == 2  # the redone round trained on the file again
    assert "node-1" in [c["name"] for c in lines[-1]["clients"]]  # its redone round was kept
    # every sample a client consumed in exactly one kept round, and each file consumed once
    for i in (1, 2):
        ledger = read_ledger(tmp_path / f"state-{i}")
        kept = sum(c["new-examples"] for line in lines for c in line["clients"] if c["name"] == f"node-{i}")
        assert kept == sum(e["samples"] for e in ledger), (i, ledger)
        assert len({e["name"] for e in ledger}) == len(ledger)
    assert sorted(e["name"] for e in read_ledger(tmp_path / "state-1")) == ["batch-0.npz", "batch-1.npz"]
    assert json.loads((run / "summary.json").read_text())["rounds"] == 4


def test_a_supernode_killed_by_a_signal_is_started_again(tmp_path, capsys):
    """kill -9 of the SuperNode alone (the OOM killer, a user) does not end `fedtide client`:
    it starts the SuperNode again, and returns when that one ends cleanly."""
    import sys

    from fedtide.deployment.client_process import _supervise

    marker = tmp_path / "started-once"
    supernode = (f"import os, pathlib, signal; m = pathlib.Path({str(marker)!r})\n"
                 "if not m.exists(): m.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
                 "print('second start')")
    assert _supervise([sys.executable, "-c", supernode], dict(os.environ), max_wait=30) == 0
    said = capsys.readouterr().err
    assert "killed by signal 9" in said and "second start" in said


def test_what_a_superlink_started_is_stopped_even_after_the_superlink_was_killed(tmp_path):
    """A SuperLink killed with SIGKILL orphans its ServerApp (a session of its own), which then
    holds the run folder's lock: `fedtide server` remembers it while it runs and stops it."""
    import signal
    import subprocess
    import sys
    import time

    from fedtide.runtimes.flower_processes import Descendants, start_time as _start_time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)")])
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the child to start", every=0.1)
        child = int(pid_file.read_text())
        record = tmp_path / "state" / "flower-processes.json"
        record.parent.mkdir()
        started = Descendants(parent.pid, record)
        started.remember()
        assert child in started.seen
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _start_time(child) is not None  # orphaned, still running
        saved = json.loads(record.read_text())
        assert Descendants.stop_leftovers(record, grace=5) == 0 and record.exists()  # its fedtide (us) still runs
        saved["owner"] = {"pid": parent.pid, "start": 1}  # as if fedtide itself was killed: the next start
        record.write_text(json.dumps(saved))  # finds the orphan in the record
        assert Descendants.stop_leftovers(record, grace=5) == 1 and not record.exists()
        deadline = time.monotonic() + 10
        while _start_time(child) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _start_time(child) is None
    finally:
        parent.kill()


def test_a_damaged_process_record_is_ignored(tmp_path):
    from fedtide.runtimes.flower_processes import Descendants

    record = tmp_path / "flower-processes.json"
    for text in ("{not json", "[1, 2]", '{"1": "x"}', '{"owner": {"pid": 1}, "processes": {"1": "x"}}'):
        record.write_text(text)
        assert Descendants.stop_leftovers(record, grace=1) == 0 and not record.exists()


def test_a_server_refuses_an_out_folder_that_holds_a_run_unless_forced(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    flags = ["server", "--insecure", "--clients", "1", "--database", str(tmp_path / "db"), "--out", str(run)]
    assert main(flags) == 2
    assert "already holds a run" in capsys.readouterr().err and (run / "summary.json").exists()
    assert main([*flags, "--force", "--resume", str(run)]) == 2
    assert "drop one of them" in capsys.readouterr().err
