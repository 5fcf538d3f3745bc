"""The inbox is a trust boundary: whatever lands there (bombs, links, pickles, absurd values,
odd names) is quarantined with a reason or trained on, never stops the client, never makes it
read outside the inbox and never reaches a log line or reason as it is."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import client.inbox as inbox_module
from client.edge import train_on_arrivals
from client.feature_range import parse_feature_range
from client.inbox import collect_arrivals
from common.config import RunConfig
from common.errors import FedtideError
from common.models import build_model
from fedtide.cli import main
from inbox_cases import SECRET_ENV, SHAPE, Canaries, batches, check, npz, put_all, zip_bombs

CLASSES = 10
TOKEN = "c4n4ry-5ecret-7f3a"
SMALL_BOMB = 160 * 2**20  # inflates past the 128 MiB limit; the benchmark's bomb inflates to 2.2 GB


@pytest.fixture
def inbox(tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def canaries(tmp_path, monkeypatch) -> Canaries:
    monkeypatch.setenv(SECRET_ENV, TOKEN)
    return Canaries(tmp_path / "outside", TOKEN)


class Lines(logging.Handler):
    """The client's log messages, as they would be written."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "Lines":
        logger = logging.getLogger("fedtide.client")
        self.level, logger.level = logger.level, logging.DEBUG
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("fedtide.client")
        logger.removeHandler(self)
        logger.setLevel(self.level)


def good(n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 64)).astype(np.float32), rng.integers(0, CLASSES, n)


def reasons(inbox: Path) -> dict[str, str]:
    folder = inbox / "quarantine"
    return {p.name.removesuffix(".reason.txt"): p.read_text() for p in folder.glob("*.reason.txt")}


def test_a_csv_field_of_200_kb_is_quarantined_not_raised(inbox):
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    (inbox / "huge.csv").write_text(f"{header}\n{'9' * 200_000}{',0.5' * 63},1\n")
    np.savez(inbox / "ok.npz", x=good()[0], y=good()[1])
    arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])
    assert [f.name for f in arrivals.files] == ["ok.npz"] and arrivals.quarantined == ["huge.csv"]
    assert "longer than" in reasons(inbox)["huge.csv"]


def test_a_zip_bomb_is_refused_before_it_is_inflated(inbox):
    for i, bomb in enumerate(zip_bombs(SMALL_BOMB)):  # honest directory, lying directory, lying header too
        (inbox / f"bomb{i}.npz").write_bytes(bomb)
    tracemalloc.start()
    try:
        arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(arrivals.quarantined) == ["bomb0.npz", "bomb1.npz", "bomb2.npz"]
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated reading bombs"
    found = reasons(inbox)
    assert "unpack to more than 128 MiB" in found["bomb0.npz"] and "16,777,216 values" in found["bomb1.npz"]
    assert "cut short" in found["bomb2.npz"]


def test_any_exception_while_parsing_quarantines_the_file(inbox, monkeypatch):
    def explode(*args, **kwargs):
        raise MemoryError("the parser ran out of memory on attacker bytes")

    monkeypatch.setattr(inbox_module, "parse_data_file", explode)
    (inbox / "a.npz").write_bytes(npz(x=good()[0], y=good()[1]))
    arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])
    assert arrivals.quarantined == ["a.npz"] and reasons(inbox)["a.npz"] == "could not be read as data (MemoryError)\n"


def test_links_are_never_followed_and_never_leak_what_they_point_to(inbox, canaries):
    os.symlink(canaries.secret_file, inbox / "secret.csv")
    os.symlink("/proc/self/environ", inbox / "environ.csv")
    os.symlink(canaries.outside_npz, inbox / "outside.npz")
    os.symlink(canaries.root, inbox / "folder.npz")
    os.symlink(canaries.root / "missing.npz", inbox / "dangling.npz")
    os.link(canaries.outside_npz, inbox / "hard.npz")
    with Lines() as lines:
        arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])
    links = {"secret.csv", "environ.csv", "outside.npz", "folder.npz", "dangling.npz"}
    assert arrivals.files == [] and set(arrivals.quarantined) == links | {"hard.npz"}
    assert all((inbox / "quarantine" / name).is_symlink() for name in links)  # the links moved, not their targets
    assert canaries.secret_file.read_text().startswith("label,") and canaries.outside_npz.is_file()
    found = reasons(inbox)
    assert all("symbolic link" in found[name] for name in links) and "hard links" in found["hard.npz"]
    assert not any(TOKEN in text for text in [*found.values(), *lines.messages])


def test_a_symlinked_quarantine_is_never_written_through(inbox, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, inbox / "quarantine")
    (inbox / "bad.csv").write_text("label\nseven\n")
    np.savez(inbox / "ok.npz", x=good()[0], y=good()[1])
    with caplog.at_level(logging.ERROR, logger="fedtide.client"):
        arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])
    assert [f.name for f in arrivals.files] == ["ok.npz"] and arrivals.quarantined == ["bad.csv"]
    assert os.listdir(elsewhere) == [] and (inbox / "bad.csv").is_file()  # left in place, said so
    assert "'bad.csv'" in caplog.text and "quarantine/ is a link or not a folder" in caplog.text
    (inbox / "quarantine").unlink()
    (inbox / "quarantine").write_text("a file")
    assert collect_arrivals(inbox, SHAPE, CLASSES, []).quarantined == ["bad.csv"] and (inbox / "bad.csv").is_file()


def test_reasons_are_private_short_and_never_quote_the_file(inbox):
    header = ",".join([f"p{i}" for i in range(63)] + [TOKEN, "label"])
    (inbox / "header.csv").write_text(f"{TOKEN},p1\n1,2\n")
    (inbox / "value.csv").write_text(header + "\n" + ",".join(["0.5"] * 63 + [TOKEN, "1"]) + "\n")
    (inbox / "member.npz").write_bytes(npz(x=good()[0], **{TOKEN: good()[1]}))
    (inbox / "field.npz").write_bytes(npz(x=np.zeros(3, dtype=[(TOKEN, "<f4")]), y=np.zeros(3)))
    collect_arrivals(inbox, SHAPE, CLASSES, [])
    found = reasons(inbox)
    assert set(found) == {"header.csv", "value.csv", "member.npz", "field.npz"}
    assert not any(TOKEN in text for text in found.values()) and all(len(t) <= 301 for t in found.values())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (inbox / "quarantine").glob("*.reason.txt"))
    assert stat.S_IMODE((inbox / "quarantine").stat().st_mode) & 0o077 == 0


def test_a_name_with_a_newline_cannot_forge_a_log_line(inbox):
    (inbox / "x.npz\n2024-01-01 INFO all good.csv").write_text("garbage")
    with Lines() as lines:
        collect_arrivals(inbox, SHAPE, CLASSES, [])
    assert lines.messages and not any("\n" in m for m in lines.messages)
    assert any("'x.npz\\n2024-01-01 INFO all good.csv'" in m for m in lines.messages)


def test_absurd_pixels_are_refused_and_never_poison_the_weights_or_the_memory(inbox, tmp_path):
    config = RunConfig.of(hidden="16", local_epochs=1, memory_size=100, quiet=True)
    weights = build_model(config.network.model, SHAPE, CLASSES, config.network.hidden_widths, config.seed).state_dict()
    x, y = good(8)
    poisoned = x.copy()
    poisoned[:, 0] = 1e30  # finite, absurd
    np.savez(inbox / "a-poison.npz", x=poisoned, y=y)
    np.savez(inbox / "b-ok.npz", x=x, y=y)
    outcome = train_on_arrivals(config, SHAPE, CLASSES, 1, weights, inbox, tmp_path / "state")
    assert (outcome.metrics["new-examples"], outcome.metrics["quarantined"]) == (8, 1)
    assert all(torch.isfinite(w).all() for w in outcome.weights.values())
    kept = [outcome.state[k] for k in ("replay.x", "replay.stage.x") if k in outcome.state]
    assert kept and all(float(x.abs().max()) <= 1.0 for x in kept)
    assert "outside [0, 1]" in reasons(inbox)["a-poison.npz"]


def test_a_round_reads_files_up_to_its_budget_and_the_rest_wait(inbox, monkeypatch):
    monkeypatch.setattr(inbox_module, "ROUND_VALUES", 64 * 5)
    for i in range(3):
        np.savez(inbox / f"{i}.npz", x=good(4, i)[0], y=good(4, i)[1])
        os.utime(inbox / f"{i}.npz", ns=(10**9 * (i + 1),) * 2)
    first = collect_arrivals(inbox, SHAPE, CLASSES, [])
    assert [f.name for f in first.files] == ["0.npz", "1.npz"]  # 1.npz passes the budget; 2.npz waits
    ledger = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in first.files]
    assert [f.name for f in collect_arrivals(inbox, SHAPE, CLASSES, ledger).files] == ["2.npz"]


def test_a_named_pipe_neither_hangs_nor_stops_the_client(inbox):
    os.mkfifo(inbox / "pipe.npz")
    assert collect_arrivals(inbox, SHAPE, CLASSES, []).quarantined == ["pipe.npz"]
    assert "not a regular file" in reasons(inbox)["pipe.npz"]


@pytest.mark.parametrize("value", ["nan,1", "0,inf", "1,0", "0,1e30", "0", "a,b", "1,2,3"])
def test_a_bad_feature_range_is_a_one_line_error(value, tmp_path, capsys):
    with pytest.raises(FedtideError, match="--feature-range must be"):
        parse_feature_range(value)
    code = main(["client", "--server", "127.0.0.1:9", "--insecure", "--data", str(tmp_path / "d"),
                 "--state", str(tmp_path / "s"), f"--feature-range={value}"])
    err = capsys.readouterr().err
    assert code == 2 and "--feature-range must be" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_the_feature_range_is_what_a_deployment_says(inbox):
    x, y = good()
    np.savez(inbox / "wide.npz", x=x * 4 - 1, y=y)
    assert parse_feature_range("-1,3") == (-1.0, 3.0)
    assert len(collect_arrivals(inbox, SHAPE, CLASSES, [], feature_range=(-1.0, 3.0)).files) == 1
    assert collect_arrivals(inbox, SHAPE, CLASSES, []).quarantined == ["wide.npz"]


@settings(max_examples=60, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(batch=batches(TOKEN, zip_bombs(SMALL_BOMB), max_size=12))
def test_generated_inboxes_are_trained_or_quarantined_and_never_leak(batch):
    os.environ[SECRET_ENV] = TOKEN
    with tempfile.TemporaryDirectory() as root:
        canaries = Canaries(Path(root) / "outside", TOKEN)
        inbox = Path(root) / "inbox"
        inbox.mkdir()
        put_all(inbox, batch, canaries)
        with Lines() as lines:
            arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])
        data = arrivals.data
        x = np.zeros((0, *SHAPE), np.float32) if data is None else data.x.numpy()
        y = np.zeros(0, np.int64) if data is None else data.y.numpy()
        assert check(inbox, batch, x, y, lines.messages, canaries) == []
        assert sorted(arrivals.quarantined) == sorted(e.name for e in batch if e.expected == "bad")

