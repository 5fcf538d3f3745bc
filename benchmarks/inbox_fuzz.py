"""Inbox fuzzing (issue 15, the trust boundary): an edge client's round on generated inboxes.

Hypothesis draws batches of files (``tests/inbox_cases.py``: zip bombs inflating to 2.2 GB,
links to a secret outside the inbox, to outside data, to /proc/self/environ, to a folder,
dangling; a hard link to outside data; huge CSV fields and lines; values out of range; NaN
and inf; truncated archives; wrong dtypes and shapes; object arrays and pickles; empty files;
a named pipe; odd names), puts each batch in a fresh inbox and runs the real edge round
(``client.edge.train_on_arrivals``, replay memory large enough to keep every trained sample).
It counts client crashes, reads outside the inbox (the secret in any log line, reason or
ledger; outside samples in the replay memory; the outside files' access times; a pickle
trap's marker file), bad files quarantined with a reason, good files trained (exactly their
samples), files left alone, rounds with non-finite weights, and the client's peak RSS
(VmHWM of the worker process that runs every round), against a stated bound.

Usage: python benchmarks/inbox_fuzz.py [--files 1000] [--seed 0] [--rss-bound-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
BOMB_BYTES = 132 * 2**24  # 2.2 GB of zeros, about 2 MB deflated: the attacker's file
TOKEN = "fuzz-secret-9d41c7"


def worker(files: int, seed: int) -> dict:
    """Run batches until ``files`` files went through the client; the figures as a dict."""
    import numpy as np
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    from client.edge import train_on_arrivals
    from client.state_store import ClientStateStore
    from common.config import RunConfig
    from common.errors import FedtideError
    from common.models import build_model
    from inbox_cases import SECRET_ENV, SHAPE, Canaries, batches, check, put_all, zip_bombs

    os.environ[SECRET_ENV] = TOKEN
    config = RunConfig.of(hidden="16", local_epochs=1, batch_size=32, memory_size=100_000, quiet=True)
    weights = build_model(config.network.model, SHAPE, 10, config.network.hidden_widths, config.seed).state_dict()
    bombs = zip_bombs(BOMB_BYTES)
    figures = Counter()
    problems: Counter = Counter()
    examples: dict[str, str] = {}
    messages: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("fedtide.client")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Lines())
    logger.propagate = False
    atime_works = _atime_works()

    def one_batch(batch) -> None:
        messages.clear()
        with tempfile.TemporaryDirectory() as root:
            canaries = Canaries(Path(root) / "outside", TOKEN)
            inbox, state = Path(root) / "inbox", Path(root) / "state"
            inbox.mkdir()
            put_all(inbox, batch, canaries)
            for outside in (canaries.secret_file, canaries.outside_npz):
                os.utime(outside, ns=(0, os.stat(outside).st_mtime_ns))
            figures["files"] += len(batch)
            figures.update(item.expected for item in batch)
            figures.update(f"kind:{item.kind}" for item in batch)
            trained_x, trained_y = np.zeros((0, *SHAPE), np.float32), np.zeros(0, np.int64)
            try:
                outcome = train_on_arrivals(config, SHAPE, 10, 1, weights, inbox, state)
                trained_x, trained_y = outcome.state["replay.x"].numpy(), outcome.state["replay.y"].numpy()
                figures["rounds"] += 1
                figures["non-finite rounds"] += not all(torch.isfinite(w).all() for w in outcome.weights.values())
                figures["trained"] += outcome.metrics["new-files"]
                ledger = json.dumps(ClientStateStore(state).load()[1])
                messages.append(ledger)
            except FedtideError as err:
                if "no data yet" not in str(err) or any(item.expected == "good" for item in batch):
                    figures["crashes"] += 1
                    examples.setdefault("crash", repr(err)[:200])
                messages.append(str(err))
            except Exception as err:  # a crash: what the fuzzing is for
                figures["crashes"] += 1
                examples.setdefault("crash", repr(err)[:200])
            if atime_works and any(os.stat(p).st_atime_ns != 0 for p in (canaries.secret_file, canaries.outside_npz)):
                problems["outside"] += 1
                examples.setdefault("outside", "a file outside the inbox was read (its access time changed)")
            for what, detail in check(inbox, batch, trained_x, trained_y, messages, canaries, ordered=False):
                problems[what] += 1
                examples.setdefault(what, detail)
            held = os.listdir(inbox / "quarantine") if (inbox / "quarantine").is_dir() else []
            figures["reasons"] += sum(name.endswith(".reason.txt") for name in held)

    started = time.perf_counter()
    round_seed = seed
    while figures["files"] < files:
        run = settings(max_examples=20, database=None, deadline=None, derandomize=False,
                       suppress_health_check=list(HealthCheck))(given(batch=batches(TOKEN, bombs))(one_batch))
        hypothesis_seed(round_seed)(run)()
        round_seed += 1
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return {"figures": dict(figures), "problems": dict(problems), "examples": examples, "atime": atime_works,
            "vm_hwm_mib": _vm_hwm_mib()}


def _atime_works() -> bool:
    """Whether reading a file whose access time is 0 sets it here (relatime does; noatime not)."""
    with tempfile.NamedTemporaryFile() as probe:
        probe.write(b"x")
        probe.flush()
        os.utime(probe.name, ns=(0, os.stat(probe.name).st_mtime_ns))
        Path(probe.name).read_bytes()
        return os.stat(probe.name).st_atime_ns != 0


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="at least this many generated files")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first batch run")
    parser.add_argument("--rss-bound-mib", type=float, default=1024.0, help="the peak RSS the client must stay under")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.files, args.seed)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--worker", "--files", str(args.files), "--seed", str(args.seed)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["rss_bound_mib"] = args.rss_bound_mib
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    f, p = result["figures"], result["problems"]
    ok = not (f.get("crashes") or f.get("non-finite rounds") or any(p.values())) and \
        result["ru_maxrss_mib"] < args.rss_bound_mib
    return 0 if ok else 1


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    f, p = result["figures"], result["problems"]
    kinds = {k.removeprefix("kind:"): v for k, v in f.items() if k.startswith("kind:")}
    bombs, links = kinds.get("bomb", 0), sum(v for k, v in kinds.items() if "link" in k)
    table = Table(title=f"Inbox fuzzing: {f['files']} generated files in {f.get('rounds', 0)} client rounds "
                        f"({f['seconds']} s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("must be")
    rows = [
        ("generated files (good / bad / ignored)", f"{f.get('good', 0)} / {f.get('bad', 0)} / {f.get('ignored', 0)}",
         ">= 1,000"),
        ("  of which zip bombs (2.2 GB inflated) / links, hard links, pipes", f"{bombs} / {links + kinds.get('fifo', 0)}",
         ""),
        ("client crashes", str(f.get("crashes", 0)), "0"),
        ("reads outside the inbox (secret leaked, outside data trained, access times)", str(p.get("outside", 0)), "0"),
        ("pickles loaded", str(p.get("pickle", 0)), "0"),
        ("forged log lines", str(p.get("forged", 0)), "0"),
        ("bad files quarantined with a reason", f"{f.get('reasons', 0)} of {f.get('bad', 0)}", "all"),
        ("batches whose quarantine is wrong", str(p.get("quarantined", 0)), "0"),
        ("good files trained (exactly their samples)", f"{f.get('trained', 0)} of {f.get('good', 0)}", "all"),
        ("batches whose trained samples are wrong", str(p.get("trained", 0)), "0"),
        ("ignored files moved", str(p.get("left", 0)), "0"),
        ("rounds with non-finite weights", str(f.get("non-finite rounds", 0)), "0"),
        ("peak client RSS (VmHWM / ru_maxrss), MiB", f"{result['vm_hwm_mib']:.0f} / {result['ru_maxrss_mib']:.0f}",
         f"< {result['rss_bound_mib']:.0f}"),
        ("outside reads also checked by access time", "yes" if result["atime"] else "no (noatime)", ""),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    for what, detail in result["examples"].items():
        print(f"first {what} problem: {detail}")


if __name__ == "__main__":
    sys.exit(main())
