"""Memory of one edge client (issue 21, item 6): `fedtide server --insecure` and one
`fedtide client --insecure` on loopback, a few rounds of the default MLP on a digits file.

Every 0.2 s it reads the memory of the client's whole process tree (`fedtide client` and
all its descendants, from /proc): RSS, and PSS and USS from /proc/PID/smaps_rollup where
readable (RSS counts the pages processes share, torch's libraries among them, once in each
process; PSS splits them between the processes). A sample is "training" while a Flower
ClientApp process runs, "idle" otherwise (before the first round and between rounds, once
the SuperNode has run for a few seconds). It prints a line per phase change while it runs,
then a table: idle (median of the idle samples) and peak while training (the sample with the
largest RSS sum), in total and per process kind (supervisor `fedtide client`, SuperNode,
SuperExec, ClientApp), and the run's final accuracy (a sanity check only: a client's random
draws follow its node id, which the SuperLink draws anew each run).

    python benchmarks/edge_footprint.py [--rounds 4] [--samples 300] [--json PATH]
        [--keep DIR] [--client-env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import Session, digits_arrays, drop_file, free_port  # noqa: E402

from fedtide.runtimes.flower_processes import process_tree  # noqa: E402

KINDS = ("supervisor", "SuperNode", "SuperExec", "ClientApp", "other")
FIGURES = ("rss", "pss", "uss")
SETTLE_SECONDS = 5.0  # a SuperNode younger than this is still starting: its samples are not "idle"
KIB = 1024
MIB = 1024 * 1024


def process_kind(pid: int, root: int) -> str:
    """What a process of the client's tree is, from its command line."""
    if pid == root:
        return "supervisor"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "other"
    if b"flwr-clientapp" in command:
        return "ClientApp"
    if b"flower-superexec" in command:
        return "SuperExec"
    if b"fedtide.deployment.supernode" in command or b"flower-supernode" in command:
        return "SuperNode"
    return "other"


def process_memory(pid: int) -> dict[str, int] | None:
    """RSS, PSS and USS of ``pid`` in bytes (PSS and USS 0 where smaps_rollup is unreadable),
    or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    figures = {"rss": 0, "pss": 0, "uss": 0}
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            figures["rss"] = int(line.split()[1]) * KIB
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return figures
    for line in rollup.splitlines():
        name, _, rest = line.partition(":")
        if name == "Pss":
            figures["pss"] = int(rest.split()[0]) * KIB
        elif name in ("Private_Clean", "Private_Dirty"):
            figures["uss"] += int(rest.split()[0]) * KIB
    return figures


@dataclass
class Sample:
    """The client tree's memory at one moment: per kind, the sum over its processes."""

    seconds: float
    phase: str  # "starting", "idle" or "training"
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def total(self, figure: str) -> int:
        return sum(kind[figure] for kind in self.kinds.values())


def take_sample(root: int, started: float, birth: dict[int, float], kinds: dict[int, str]) -> Sample:
    """``kinds``: what each process was when first seen (an exiting process's command line
    reads empty)."""
    now = time.monotonic()
    sample = Sample(now - started, "starting")
    settled = False
    for pid in process_tree(root):
        figures = process_memory(pid)
        if figures is None or figures["rss"] == 0:  # gone, or a zombie not reaped yet
            continue
        kind = kinds.get(pid) or process_kind(pid, root)
        if kind != "other":
            kinds[pid] = kind
        birth.setdefault(pid, now)
        settled |= kind == "SuperNode" and now - birth[pid] >= SETTLE_SECONDS
        into = sample.kinds.setdefault(kind, dict.fromkeys(FIGURES, 0))
        for figure in FIGURES:
            into[figure] += figures[figure]
        sample.count[kind] = sample.count.get(kind, 0) + 1
    if "ClientApp" in sample.kinds:
        sample.phase = "training"
    elif settled:
        sample.phase = "idle"
    return sample


def sample_tree(client: Session, stop: threading.Event, samples: list[Sample], every: float = 0.2) -> None:
    """Sample the client's tree until ``stop``; print a line when a ClientApp process starts
    and when the tree is idle again (with the largest RSS sum of the training phase)."""
    started, birth, kinds, phase, apps, peak = time.monotonic(), {}, {}, None, 0, 0
    while not stop.wait(every):
        sample = take_sample(client.process.pid, started, birth, kinds)
        if not sample.kinds:
            continue
        samples.append(sample)
        peak = max(peak, sample.total("rss")) if sample.phase == "training" else peak
        seen = sum(kind == "ClientApp" for kind in kinds.values())
        if seen > apps or sample.phase != phase:
            said = f"ClientApp process {seen} started" if seen > apps else sample.phase
            if sample.phase == "idle" and phase == "training":
                said += f" (training peak RSS {peak / MIB:.0f} MiB)"
            print(f"  {sample.seconds:6.1f} s  {said}: RSS {sample.total('rss') / MIB:.0f} MiB, "
                  f"PSS {sample.total('pss') / MIB:.0f} MiB", file=sys.stderr, flush=True)
            phase, apps = sample.phase, seen


def summarise(samples: list[Sample]) -> dict:
    """Idle: per kind and in total, the median over the idle samples; peak: the training
    sample with the largest RSS sum, and the largest of each figure over all training samples."""
    idle = [s for s in samples if s.phase == "idle"]
    training = [s for s in samples if s.phase == "training"]
    result: dict = {"sample_counts": {"idle": len(idle), "training": len(training)}}
    if idle:
        result["idle"] = {
            "total_mib": {f: statistics.median(s.total(f) for s in idle) / MIB for f in FIGURES},
            "max_total_mib": {f: max(s.total(f) for s in idle) / MIB for f in FIGURES},
            "kinds_mib": {
                kind: {f: statistics.median(s.kinds.get(kind, {}).get(f, 0) for s in idle) / MIB for f in FIGURES}
                for kind in KINDS if any(kind in s.kinds for s in idle)
            },
        }
    if training:
        peak = max(training, key=lambda s: s.total("rss"))
        result["peak"] = {
            "total_mib": {f: peak.total(f) / MIB for f in FIGURES},
            "max_total_mib": {f: max(s.total(f) for s in training) / MIB for f in FIGURES},
            "kinds_mib": {kind: {f: peak.kinds[kind][f] / MIB for f in FIGURES} for kind in KINDS if kind in peak.kinds},
            "processes": peak.count,
        }
    return result


def run(rounds: int, samples: int, folder: Path, client_env: dict[str, str]) -> dict:
    """Server and client on loopback until the server's run ends; the client's memory figures."""
    address = f"127.0.0.1:{free_port()}"
    drop_file(folder / "data", "batch-0.npz", *digits_arrays(seed=1, count=samples))
    sessions: list[Session] = []
    stop = threading.Event()
    taken: list[Sample] = []
    saved = {name: os.environ.get(name) for name in client_env}
    try:
        server = Session(
            ["server", "--insecure", "--clients", "1", "--database", str(folder / "superlink.db"),
             "--out", str(folder / "run"), "--address", address, "--num-tasks", "1",
             "--rounds-per-task", str(rounds), "--local-epochs", "1", "--quiet"],
            folder / "server.log", folder,
        )
        sessions.append(server)
        os.environ.update(client_env)  # Session passes this process's environment on
        client = Session(["client", "--insecure", "--server", address, "--data", str(folder / "data"),
                          "--state", str(folder / "state")], folder / "client.log", folder)
        sessions.append(client)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        print(f"server and client started on {address}; {rounds} rounds", file=sys.stderr, flush=True)
        sampler = threading.Thread(target=sample_tree, args=(client, stop, taken), daemon=True)
        sampler.start()
        code = server.wait(timeout=900)
        if code != 0:
            raise SystemExit(f"the server failed (exit {code}):\n{server.output()[-3000:]}")
        time.sleep(3)  # the client waits for the next run: idle again
    finally:
        stop.set()
        for session in sessions:
            session.kill()
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return {
        "rounds": rounds,
        "samples": samples,
        "client_env": client_env,
        "final_accuracy": summary["final_task_accuracies"][-1],
        **summarise(taken),
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edge client memory (MiB): {result['rounds']} rounds of the default MLP, "
                  f"{result['samples']} digits samples")
    table.add_column("process")
    for column in ("idle RSS", "idle PSS", "idle USS", "peak RSS", "peak PSS", "peak USS"):
        table.add_column(column, justify="right")
    idle, peak = result.get("idle", {}), result.get("peak", {})

    def cells(section: dict, kind: str | None) -> list[str]:
        figures = section.get("total_mib") if kind is None else section.get("kinds_mib", {}).get(kind)
        return ["-" if not figures else f"{figures[f]:.0f}" for f in FIGURES]

    for kind in KINDS:
        if kind in idle.get("kinds_mib", {}) or kind in peak.get("kinds_mib", {}):
            table.add_row(kind, *cells(idle, kind), *cells(peak, kind))
    table.add_row("[bold]client tree", *cells(idle, None), *cells(peak, None))
    Console().print(table)
    print(f"samples taken: {result['sample_counts']}; final accuracy {100 * result['final_accuracy']:.2f}% "
          "(it varies with the node id the SuperLink draws)"
          + (f"; client environment {result['client_env']}" if result["client_env"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=300, help="digits samples in the client's data file")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (an empty or new folder) and keep the logs there")
    parser.add_argument("--client-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the client's processes (repeatable), "
                        "e.g. MALLOC_ARENA_MAX=2")
    args = parser.parse_args()
    client_env = dict(item.split("=", 1) for item in args.client_env)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        result = run(args.rounds, args.samples, Path(args.keep), client_env)
    else:
        with tempfile.TemporaryDirectory(prefix="fedtide-edge-footprint-") as folder:
            result = run(args.rounds, args.samples, Path(folder), client_env)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
