"""Deployment chaos soak on loopback: a TLS federation (`fedtide certs`, `fedtide server`, two
`fedtide client`s fed with `fedtide split-files` output) whose processes are SIGKILLed at seeded
points, restarted (`fedtide server --resume`), and one client rejoins with a corrupted state file.

The same federation also runs once undisturbed (same seed, same files, same feeding), and the
soak prints what must hold whatever was killed (every round exactly once in metrics.jsonl, every
sample of client 1 in exactly one kept round, the run finished with summary.json, no process of the
soak left running) and the figures of both runs side by side, with the reasons the disturbed run's
figures cannot equal the undisturbed run's.

    python benchmarks/chaos.py [--seed 0] [--rounds-per-task 4] [--round-timeout 60] [--json]

The data: scikit-learn's digits, 5 class-incremental tasks, 2 clients, one file per client and
round (`split-files --files-per-task` = rounds per task), dropped into a client's folder as soon as
the round before it is in metrics.jsonl. The kill points, in this order, each in a seeded round
and a seeded moment after a client started training (a Flower ClientApp process is running):

    server      kill -9 of `fedtide server`, then `fedtide server --resume`
    supernode   kill -9 of client 1's Flower SuperNode (its `fedtide client` stays)
    superlink   kill -9 of the Flower SuperLink (`fedtide server` must stop with an error), resume
    client      kill -9 of `fedtide client` 2; bytes of its state file flipped or cut; restart
    clientapp   kill -9 of client 1's ClientApp process in the middle of a round
    serverapp   kill -9 of the Flower ServerApp process, then resume

Exit code 0 when every check holds, 1 otherwise. Temporary files go to a folder that is removed
at the end (--keep DIR keeps them there instead).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import Session, free_port, read_ledger  # noqa: E402

CLIENTS = (1, 2)
NUM_TASKS = 5
# where each kill lands: the earliest round, as a fraction of the run, and which process it hits
PLAN = (("server", 0.15), ("supernode", 0.3), ("superlink", 0.45), ("client", 0.6), ("clientapp", 0.75), ("serverapp", 0.85))
PROCESS_NAMES = {"superlink": "flower-superlink", "serverapp": "flwr-serverapp", "supernode": "-m fedtide.deployment.supernode",
                 "clientapp": "flwr-clientapp"}


@dataclass
class Kill:
    what: str  # a name of PLAN
    round: int  # fire once this round's training started
    delay: float  # seconds after that
    corruption: str = ""  # "client" only: how its state file is damaged
    fired_in: int | None = None  # the round in progress when it fired
    note: str = ""  # what followed


def plan_kills(seed: int, rounds: int) -> list[Kill]:
    rng = random.Random(seed)
    kills = []
    for what, at in PLAN:
        first = max(2, round(at * rounds))
        kills.append(Kill(what, rng.randint(first, first + 1), rng.uniform(0.0, 1.5),
                          rng.choice(["flip", "truncate"]) if what == "client" else ""))
    return kills


# ---- processes ---------------------------------------------------------------------------------

def proc_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (parent pid, session id, start time in ticks, state) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return table


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Fleet:
    """The federation's processes: started as a user would, every process they ever spawned
    remembered (pid and start time), so that what outlives its parent is found."""

    def __init__(self, folder: Path, certs: Path, parts: Path, settings: list[str], rounds: int) -> None:
        self.folder, self.certs, self.parts, self.settings, self.rounds = folder, certs, parts, settings, rounds
        self.run = folder / "run"
        self.address = f"127.0.0.1:{free_port()}"
        self.sessions: list[Session] = []
        self.server: Session | None = None
        self.clients: dict[int, Session] = {}
        self.seen: dict[tuple[int, int], str] = {}  # (pid, start time) -> command line
        self.fed = 0  # rounds whose files are in the clients' folders
        self.starts = {"server": 0, **{f"client-{i}": 0 for i in CLIENTS}}
        folder.mkdir(parents=True, exist_ok=True)

    def _start(self, name: str, args: list[str]) -> Session:
        self.starts[name] += 1
        session = Session(args, self.folder / f"{name}-{self.starts[name]}.log", self.folder)
        self.sessions.append(session)
        return session

    def start_server(self, resume: bool) -> None:
        where = ["--certs", str(self.certs), "--database", str(self.folder / "superlink.db"), "--address", self.address]
        args = ["server", "--resume", str(self.run), *where] if resume else ["server", *where, "--out", str(self.run), *self.settings]
        self.server = self._start("server", args + ["--quiet"])

    def start_client(self, i: int) -> None:
        self.clients[i] = self._start(f"client-{i}", [
            "client", "--server", self.address, "--certs", str(self.certs), "--node-key", str(self.certs / f"node-{i}.key"),
            "--data", str(self.folder / f"data-{i}"), "--state", str(self.state(i))])

    def state(self, i: int) -> Path:
        return self.folder / f"state-{i}"

    def track(self) -> dict[int, tuple[int, int, str, str]]:
        """Remember every process of every session started so far; return the process table."""
        table = proc_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _, _) in table.items():
            children.setdefault(parent, []).append(pid)
        for session in self.sessions:
            root = session.process.pid
            tree = [root] + [pid for pid, row in table.items() if row[1] == root]
            for pid in tree:
                tree += [c for c in children.get(pid, []) if c not in tree]
            for pid in tree:
                if pid in table and (pid, table[pid][2]) not in self.seen:
                    self.seen[(pid, table[pid][2])] = cmdline(pid)
        return table

    def find(self, session: Session, name: str) -> int | None:
        """A live process of ``session`` whose command line holds ``name``."""
        return next((pid for pid in session.pids() if name in cmdline(pid)), None)

    def alive(self) -> list[str]:
        """The remembered processes still running (zombies count as gone)."""
        table = proc_table()
        return [f"{pid} {line[:100]}" for (pid, start), line in self.seen.items()
                if pid in table and table[pid][2] == start and table[pid][3] != "Z"]

    def wait_gone(self, session: Session, timeout: float = 30.0) -> list[str]:
        """Wait until the processes ever seen in ``session`` are gone; return those left."""
        self.track()
        mine = {key for key in self.seen if key[0] in set(session.pids()) | {session.process.pid}}
        deadline = time.monotonic() + timeout
        while True:
            table = proc_table()
            left = [f"{pid} {self.seen[(pid, start)][:100]}" for pid, start in mine
                    if pid in table and table[pid][2] == start and table[pid][3] != "Z"]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def completed(self) -> list[int]:
        metrics = self.run / "metrics.jsonl"
        text = metrics.read_text() if metrics.exists() else ""
        return [json.loads(line)["round"] for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]

    def feed(self, through: int) -> None:
        """Put each round's file up to ``through`` into each client's folder (once), the way a
        producer should: a temporary name, then a rename."""
        per_task = self.rounds // NUM_TASKS
        while self.fed < min(through, self.rounds):
            task, part = divmod(self.fed, per_task)
            for i in CLIENTS:
                source = self.parts / f"client-{i}" / f"t{task}-{part}.npz"
                if source.exists():  # a client may get no sample of a task
                    folder = self.folder / f"data-{i}"
                    folder.mkdir(exist_ok=True)
                    shutil.copyfile(source, folder / f".{source.name}.tmp")
                    os.replace(folder / f".{source.name}.tmp", folder / source.name)
            self.fed += 1

    def kill_all(self) -> None:
        for session in self.sessions:
            if session.process.poll() is None:
                session.kill()
        table = proc_table()
        for pid, start in self.seen:
            if pid in table and table[pid][2] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---- one federation ----------------------------------------------------------------------------

def corrupt(path: Path, how: str, rng: random.Random) -> str:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        cut = rng.randrange(1, len(raw))
        path.write_bytes(bytes(raw[:cut]))
        return f"cut to {cut} of {len(raw)} bytes"
    spots = sorted(rng.sample(range(len(raw)), 3))
    for spot in spots:
        raw[spot] ^= 0xFF
    path.write_bytes(bytes(raw))
    return f"bytes {spots} of {len(raw)} flipped"


def fire(kill: Kill, fleet: Fleet, round_now: int, rng: random.Random) -> list[str]:
    """SIGKILL what ``kill`` names and start again what a user (or a service manager) would;
    return the processes that outlived it."""
    kill.fired_in = round_now
    server, client1 = fleet.server, fleet.clients[1]
    assert server is not None
    if kill.what == "server":
        os.kill(server.process.pid, signal.SIGKILL)
        left = fleet.wait_gone(server)
        fleet.start_server(resume=True)
    elif kill.what in ("superlink", "serverapp"):
        os.kill(fleet.find(server, PROCESS_NAMES[kill.what]) or server.process.pid, signal.SIGKILL)
        try:
            code = server.wait(timeout=90)
            said = [line for line in server.output().splitlines() if line.startswith("fedtide: error")]
            kill.note = f"`fedtide server` exited {code}: {said[-1][:110] if said else 'no error message'}"
        except Exception:  # noqa: BLE001 - it must stop by itself; say so when it does not
            kill.note = "`fedtide server` did not stop within 90 s: killed"
            os.kill(server.process.pid, signal.SIGKILL)
        left = fleet.wait_gone(server)
        fleet.start_server(resume=True)
    elif kill.what == "client":
        client2 = fleet.clients[2]
        os.kill(client2.process.pid, signal.SIGKILL)
        left = fleet.wait_gone(client2)
        state = fleet.state(2) / "state.safetensors"
        kill.note = corrupt(state, kill.corruption, rng) if state.exists() else "no state file yet"
        fleet.start_client(2)
    else:  # supernode, clientapp: client 1's `fedtide client` stays
        os.kill(fleet.find(client1, PROCESS_NAMES[kill.what]), signal.SIGKILL)
        left = []
    return left


def soak(fleet: Fleet, kills: list[Kill], seed: int, timeout: float) -> dict:
    """Run the federation to its end, firing ``kills``; return what was observed."""
    rng = random.Random(seed + 1)
    pending = list(kills)
    ready_since: float | None = None
    leftovers: dict[str, list[str]] = {}
    unplanned: list[str] = []
    started = time.monotonic()
    fleet.start_server(resume=False)
    for i in CLIENTS:
        fleet.start_client(i)
    while True:
        fleet.track()
        done = fleet.completed()
        fleet.feed(len(done) + 1)
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the soak did not end within {timeout:.0f} s ({len(done)} rounds done)")
        if pending:
            kill = pending[0]
            target = fleet.clients[1] if kill.what in ("supernode", "clientapp") else None
            training = [s for s in ([target] if target else fleet.clients.values()) if s.running_clientapp()]
            if len(done) + 1 >= kill.round and training:
                ready_since = ready_since or time.monotonic()
                needed = PROCESS_NAMES.get(kill.what)
                if time.monotonic() - ready_since >= kill.delay and (
                        target is None or needed is None or fleet.find(target, needed)):
                    leftovers[kill.what] = fire(pending.pop(0), fleet, len(done) + 1, rng)
                    ready_since = None
                    continue
        assert fleet.server is not None
        code = fleet.server.process.poll()
        if code is not None:
            if code == 0 and (fleet.run / "summary.json").exists():
                break
            _unplanned(unplanned, "server", fleet.server, len(done) + 1)
            fleet.wait_gone(fleet.server)
            fleet.start_server(resume=True)
        for i, session in list(fleet.clients.items()):
            if session.process.poll() is not None:
                _unplanned(unplanned, f"client {i}", session, len(done) + 1)
                fleet.wait_gone(session)
                fleet.start_client(i)
        time.sleep(0.2)
    wall = time.monotonic() - started
    for session in fleet.clients.values():  # a user stops a client service: SIGTERM
        os.kill(session.process.pid, signal.SIGTERM)
    stopped = {i: _exit_code(session, 30) for i, session in fleet.clients.items()}
    time.sleep(2)
    return {"wall": wall, "leftovers": leftovers, "unplanned": unplanned, "left_at_end": fleet.alive(),
            "client_exit_codes": stopped}


MAX_UNPLANNED = 4  # restarts after exits nobody caused, before the soak gives up


def _unplanned(said: list[str], name: str, session: Session, round_now: int) -> None:
    """Note an exit the soak did not cause (a user or a service manager would start it again);
    give up when they keep coming: a restart that cannot work."""
    lines = session.output().strip().splitlines()
    said.append(f"{name} exited {session.process.returncode} in round {round_now}: {lines[-1][:160] if lines else ''}")
    if len(said) > MAX_UNPLANNED:
        raise RuntimeError("the soak gives up after these exits nobody caused:\n" + "\n".join(said))


def _exit_code(session: Session, timeout: float) -> int | None:
    try:
        return session.wait(timeout=timeout)
    except Exception:  # noqa: BLE001 - still running: the check reports it
        return None


# ---- figures -----------------------------------------------------------------------------------

def figures(run: Path, fleet: Fleet) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    replies = [len(line["clients"]) for line in lines]
    ledgers = {i: read_ledger(fleet.state(i)) for i in CLIENTS}
    aside = {i: sorted(p.name for p in fleet.state(i).glob("state.safetensors.corrupt-*")) for i in CLIENTS}
    return {
        "rounds": [line["round"] for line in lines],
        "acc": summary["acc"], "bwt": summary["bwt"], "fwt": summary["fwt"], "forgetting": summary["forgetting"],
        "final_prequential_acc": summary.get("final_prequential_acc"),
        "final_task_accuracies": summary["final_task_accuracies"],
        "drift_events": summary.get("drift_events"),
        "replies": sum(replies), "rounds_short_of_a_reply": sum(r < len(CLIENTS) for r in replies),
        "rounds_without_new_file": sum(
            1 for line in lines for c in line["clients"] if c.get("new-files", 1) == 0),
        "replies_without_new_file": [line["round"] for line in lines for c in line["clients"] if c.get("new-files", 1) == 0],
        "ledger_files": {i: len(ledger) for i, ledger in ledgers.items()},
        # samples of the files each client consumed (its ledger), and the new samples its replies
        # brought into kept rounds (metrics.jsonl): equal when every sample reached exactly one
        "samples_consumed": {i: sum(int(e.get("samples", 0)) for e in ledger) for i, ledger in ledgers.items()},
        "samples_in_kept_rounds": {i: sum(int(c.get("new-examples", 0)) for line in lines for c in line["clients"]
                                          if c.get("name") == f"node-{i}") for i in CLIENTS},
        "ledger_rounds": {i: {e["name"]: e["round"] for e in ledger} for i, ledger in ledgers.items()},
        "moved_aside": aside,
    }


def reasons(reference: dict, chaos: dict, kills: list[Kill]) -> list[str]:
    """Why the disturbed run's figures differ from the undisturbed one's, from what happened."""
    said = []
    redone = [k.fired_in for k in kills if k.what in ("server", "superlink", "serverapp")]
    if redone:
        said.append(f"rounds {redone} were killed on the server and redone after --resume: the redone round "
                    "samples and trains again, from the clients' state before the killed attempt (its pending outcome is "
                    "dropped, its files trained on again)")
    if chaos["rounds_short_of_a_reply"] > reference["rounds_short_of_a_reply"]:
        said.append(f"{chaos['rounds_short_of_a_reply']} round(s) aggregated one client's reply only: a client was "
                    "killed or not yet let back in (a restarted node waits for its old session to expire)")
    if chaos["moved_aside"][2]:
        again = [n for n, r in chaos["ledger_rounds"][2].items() if r > reference["ledger_rounds"][2].get(n, r)]
        said.append("client 2 restarted with a corrupted state file: moved aside, so it lost its replay memory, "
                    f"drift detector and ledger, and trained once more on the {len(again)} files still in its folder "
                    f"that it had trained on before (in round {min((chaos['ledger_rounds'][2][n] for n in again), default='-')})")
    moved = {i: sorted(n for n, r in chaos["ledger_rounds"][i].items() if reference["ledger_rounds"][i].get(n) != r)
             for i in CLIENTS}
    if any(moved.values()):
        said.append(f"files first trained on in another round than undisturbed: { {i: len(m) for i, m in moved.items()} } "
                    "(a client that was down trains on what arrived meanwhile when it is back)")
    return said


def checks(chaos: dict, soaked: dict, rounds: int) -> list[tuple[str, bool, str]]:
    seen = chaos["rounds"]
    dupes = sorted({r for r in seen if seen.count(r) > 1})
    gaps = sorted(set(range(1, rounds + 1)) - set(seen))
    left = sorted(set(soaked["left_at_end"]) | {p for ps in soaked["leftovers"].values() for p in ps})
    consumed, kept = chaos["samples_consumed"][1], chaos["samples_in_kept_rounds"][1]
    return [
        ("every sample of client 1 in exactly one kept round", consumed == kept,
         f"{consumed} samples in its files, {kept} new samples in kept rounds (client 2 retrains by design: its "
         f"state was corrupted; {chaos['samples_consumed'][2]} vs {chaos['samples_in_kept_rounds'][2]})"),
        ("every round exactly once in metrics.jsonl", not dupes and not gaps and seen == sorted(seen),
         f"{len(seen)} lines; duplicates {dupes or 'none'}; gaps {gaps or 'none'}"),
        ("the run finished (summary.json)", True, f"{len(seen)} of {rounds} rounds"),
        ("the corrupted state was moved aside, the client started clean", bool(chaos["moved_aside"][2]),
         ", ".join(chaos["moved_aside"][2]) or "nothing moved aside"),
        ("no process outlived what it belonged to", not left, "; ".join(left) or "none"),
        ("clients stop on SIGTERM", all(c == 0 for c in soaked["client_exit_codes"].values()),
         f"exit codes {soaked['client_exit_codes']}"),
        ("no unplanned exit", not soaked["unplanned"], " | ".join(soaked["unplanned"]) or "none"),
    ]


# ---- main --------------------------------------------------------------------------------------

def federation(folder: Path, certs: Path, parts: Path, settings: list[str], rounds: int, kills: list[Kill],
               seed: int, timeout: float) -> tuple[dict, dict]:
    fleet = Fleet(folder, certs, parts, settings, rounds)
    try:
        soaked = soak(fleet, kills, seed, timeout)
        return soaked, figures(fleet.run, fleet)
    finally:
        fleet.kill_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seeds the run, the data split and the kill points")
    parser.add_argument("--rounds-per-task", type=int, default=4, help=f"rounds per task ({NUM_TASKS} tasks)")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--round-timeout", type=float, default=60.0,
                        help="seconds a round waits for replies (a killed client costs its round this long)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds each federation may take at most")
    parser.add_argument("--keep", metavar="DIR", help="keep the folders (logs, run folders) in DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args()

    from fedtide.cli import main as fedtide

    rounds = NUM_TASKS * args.rounds_per_task
    data = ["--dataset", "digits", "--num-tasks", str(NUM_TASKS), "--clients", str(len(CLIENTS)), "--seed", str(args.seed)]
    settings = [*data, "--rounds-per-task", str(args.rounds_per_task), "--local-epochs", str(args.local_epochs),
                "--method", "replay", "--round-timeout", str(args.round_timeout)]
    kills = plan_kills(args.seed, rounds)
    root = Path(args.keep or tempfile.mkdtemp(prefix="fedtide-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        certs, parts = root / "certs", root / "parts"
        fedtide(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", str(len(CLIENTS)), "--force"])
        fedtide(["split-files", "--to", str(parts), "--files-per-task", str(args.rounds_per_task), "--force", *data])
        began = time.monotonic()
        _, reference = federation(root / "undisturbed", certs, parts, settings, rounds, [], args.seed, args.timeout)
        reference_wall = time.monotonic() - began
        began = time.monotonic()
        soaked, chaos = federation(root / "chaos", certs, parts, settings, rounds, kills, args.seed, args.timeout)
        chaos_wall = time.monotonic() - began
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results = checks(chaos, soaked, rounds)
    report = {"seed": args.seed, "rounds": rounds, "kills": [k.__dict__ for k in kills], "checks": results,
              "undisturbed": reference, "chaos": chaos, "why_they_differ": reasons(reference, chaos, kills),
              "seconds": {"undisturbed": reference_wall, "chaos": chaos_wall}}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        show(report)
    return 0 if all(ok for _, ok, _ in results) else 1


def show(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    kills = Table(title=f"kill points (seed {report['seed']}, {report['rounds']} rounds)")
    for column in ("what", "planned round", "delay s", "fired in round", "then"):
        kills.add_column(column)
    for k in report["kills"]:
        kills.add_row(k["what"], str(k["round"]), f"{k['delay']:.2f}", str(k["fired_in"]),
                      k["note"] or ("resumed" if k["what"] == "server" else ""))
    console.print(kills)
    verdicts = Table(title="checks")
    for column in ("check", "holds", "detail"):
        verdicts.add_column(column)
    for name, ok, detail in report["checks"]:
        verdicts.add_row(name, "[green]yes[/]" if ok else "[red]NO[/]", detail)
    console.print(verdicts)
    ref, chaos = report["undisturbed"], report["chaos"]
    table = Table(title="figures: undisturbed vs chaos")
    for column in ("figure", "undisturbed", "chaos", "difference"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    for key, label, scale in (("acc", "ACC %", 100), ("bwt", "BWT pts", 100), ("fwt", "FWT pts", 100),
                              ("forgetting", "forgetting pts", 100), ("final_prequential_acc", "final prequential acc %", 100),
                              ("drift_events", "drift events", 1), ("replies", "client replies aggregated", 1),
                              ("rounds_short_of_a_reply", "rounds with one reply", 1),
                              ("rounds_without_new_file", "replies with no new file", 1)):
        a, b = ref[key], chaos[key]
        diff = "" if a is None or b is None else f"{scale * (b - a):+.2f}" if scale != 1 else f"{b - a:+d}"
        fmt = (lambda v: "n/a" if v is None else f"{scale * v:.2f}") if scale != 1 else str
        table.add_row(label, fmt(a), fmt(b), diff)
    for i in CLIENTS:
        table.add_row(f"client {i}: files in its ledger", str(ref["ledger_files"][i]), str(chaos["ledger_files"][i]),
                      f"{chaos['ledger_files'][i] - ref['ledger_files'][i]:+d}")
    table.add_row("final accuracy per task %", " ".join(f"{100 * a:.0f}" for a in ref["final_task_accuracies"]),
                  " ".join(f"{100 * a:.0f}" for a in chaos["final_task_accuracies"]), "")
    seconds = report["seconds"]
    table.add_row("wall time s", f"{seconds['undisturbed']:.0f}", f"{seconds['chaos']:.0f}",
                  f"{seconds['chaos'] - seconds['undisturbed']:+.0f}")
    console.print(table)
    console.print("[bold]Why the chaos run's figures cannot equal the undisturbed run's:[/]")
    for line in report["why_they_differ"]:
        console.print(f"- {line}")


if __name__ == "__main__":
    sys.exit(main())
