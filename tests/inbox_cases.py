"""Generated inbox files, to show that the edge client's inbox survives whatever is put there
(``tests/test_inbox_safety.py``, ``benchmarks/inbox_fuzz.py``).

``batches(bomb_bytes)`` is a hypothesis strategy of lists of ``Entry``: a file a careless or
hostile writer puts in an inbox, under an odd name (newlines, control and bidi characters,
undecodable bytes, 250-byte names), with what the client must do with it:

- ``good``: valid data; its samples (``x`` float32 ``[N, 1, 8, 8]``, ``y`` int64) must be trained;
- ``bad``: it must be quarantined with a reason: zip bombs (honest, lying directory, lying
  directory and array header), links (to a secret outside the inbox, to valid data outside,
  to ``/proc/self/environ``, to a folder, dangling), a hard link to data outside, huge CSV
  fields and lines, values out of range, NaN and inf, truncated archives, wrong dtypes and
  shapes, object arrays and pickles (a trap that leaves a marker file if ever unpickled),
  empty files, bzip2/lzma members, too many members, a named pipe;
- ``ignored``: not data by the inbox's convention (hidden, unfinished, other endings, also as
  links): it must stay where it is, unread.

``Canaries`` plants what must never leak: a secret token in a file outside the inbox, in the
environment and in the bad files' own bytes (names of columns, members, fields), and outside
samples that must never be trained on. ``check`` returns every broken promise of one batch.
"""

from __future__ import annotations

import bz2
import functools
import io
import os
import pickle
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from hypothesis import strategies as st

SHAPE, CLASSES = (1, 8, 8), 10
OUTSIDE_PIXEL = np.float32(0.3141)  # every pixel of the outside samples: no generated good sample has it
SECRET_ENV = "FEDTIDE_FUZZ_SECRET"


@dataclass
class Canaries:
    """What lies outside the inbox: ``secret_file`` (text holding ``token``), ``outside_npz``
    (valid data of ``OUTSIDE_PIXEL`` samples), the pickle trap's ``marker`` (must never exist)."""

    root: Path
    token: str

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.secret_file = self.root / "secret.csv"
        self.secret_file.write_text(f"label,{self.token}\n{self.token},1\n")
        self.outside_npz = self.root / "outside.npz"
        np.savez(self.outside_npz, x=np.full((5, 64), OUTSIDE_PIXEL, np.float32), y=np.full(5, 7))
        self.marker = trap_marker(self.token)


def trap_marker(token: str) -> Path:
    return Path(tempfile.gettempdir()) / f"fedtide-unpickled-{token}"


class Trap:
    """Unpickling this creates the marker file: a pickle ever loaded is seen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Entry:
    kind: str
    name: str
    expected: str  # good, bad, ignored
    put: Callable[[Path, Canaries], None] = field(repr=False)
    x: np.ndarray | None = field(default=None, repr=False)
    y: np.ndarray | None = field(default=None, repr=False)


# ---- bytes of files --------------------------------------------------------------------------

def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npz_compressed(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def zip_archive(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of (name, deflated or stored payload, method, declared uncompressed size, CRC):
    its directory says whatever it is told, as an attacker's would."""
    out, central = bytearray(), bytearray()
    for name, payload, method, size, crc in members:
        offset, raw = len(out), name.encode()
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), size, len(raw), 0)
        out += raw + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(payload), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    start = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, 0)
    return bytes(out)


@functools.lru_cache(maxsize=4)
def zip_bombs(inflated: int) -> tuple[bytes, ...]:
    """Three .npz bombs of ``inflated`` bytes of float64 zeros in x, a few MB deflated: with
    an honest directory, with a directory that claims 4 KB (and the CRC of those 4 KB), and
    with that directory plus an array header that claims 100 samples. Built from one deflated
    16 MiB block repeated."""
    block, block_of_zeros = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(2**24)
    zeros = block.compress(block_of_zeros) + block.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15)
    final = end.compress(b"") + end.flush()
    repeats = max(1, inflated // 2**24)
    y = npz(y=np.zeros(1))
    y_member = zipfile.ZipFile(io.BytesIO(y)).read("y.npy")

    def bomb(header: bytes, claimed: int) -> bytes:
        head = zlib.compressobj(9, zlib.DEFLATED, -15)
        stream = head.compress(header) + head.flush(zlib.Z_FULL_FLUSH) + zeros * repeats + final
        crc = zlib.crc32(header + bytes(min(claimed, 4096) - len(header)))
        if claimed > 4096:
            crc = functools.reduce(lambda c, _: zlib.crc32(block_of_zeros, c), range(repeats), zlib.crc32(header))
        return zip_archive([("x.npy", stream, 8, claimed, crc), ("y.npy", y_member, 0, len(y_member), zlib.crc32(y_member))])

    honest = npy_header((repeats * 2**21, 8))  # 2**21 rows of 8 float64 = 16 MiB
    return (bomb(honest, len(honest) + repeats * 2**24), bomb(honest, 4096), bomb(npy_header((100, 8)), 4096))


# ---- generated entries -----------------------------------------------------------------------

def _good(kind: str, rng: np.random.Generator) -> tuple[bytes, np.ndarray, np.ndarray, str]:
    n = int(rng.integers(1, 12))
    y = rng.integers(0, CLASSES, n)
    pixels = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    if kind == "good-uint8":
        x = pixels.reshape([(n, 8, 8), (n, 1, 8, 8), (n, 64)][int(rng.integers(3))])
        maker = npz if rng.random() < 0.5 else npz_compressed
        return maker(x=x, y=y.astype(rng.choice(["int64", "int32", "uint8", "float64"]))), \
            (pixels / np.float32(255)).astype(np.float32).reshape(n, *SHAPE), y, ".npz"
    values = rng.random((n, 64)).astype(np.float32)
    values[rng.random((n, 64)) < 0.1] = rng.choice([0.0, 1.0])  # the range's ends are in it
    if kind == "good-float":
        x = values.astype(rng.choice(["float32", "float64"]))
        return npz(x=x, y=y), values.reshape(n, *SHAPE), y, ".npz"
    label = int(rng.integers(65))
    header = [f"p{i}" for i in range(64)]
    header.insert(label, rng.choice(["label", ' "label" ']))
    newline = rng.choice(["\n", "\r\n"])
    lines = [",".join(header)]
    for row, lab in zip(values, y):
        cells = [repr(float(v)) for v in row]
        cells.insert(label, rng.choice([str(lab), f"{lab}.0"]))
        lines.append(",".join(cells))
        if rng.random() < 0.1:
            lines.append("")  # blank lines are skipped
    text = ("\ufeff" if rng.random() < 0.2 else "") + newline.join(lines) + (newline if rng.random() < 0.7 else "")
    return text.encode(), values.reshape(n, *SHAPE), y, ".csv"


GOOD = ("good-uint8", "good-float", "good-csv")


def _bad(kind: str, rng: np.random.Generator, token: str, bomb_bytes: tuple[bytes, ...]) -> tuple[bytes, str]:
    """The bytes of a bad file of ``kind`` and its ending; the token is hidden where a careless
    reason would echo it (column, member and field names, values)."""
    n = int(rng.integers(1, 6))
    x, y = rng.random((n, 64)).astype(np.float32), rng.integers(0, CLASSES, n)
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    row = ",".join(["0.5"] * 64 + ["1"])
    if kind == "bomb":
        return bomb_bytes[int(rng.integers(len(bomb_bytes)))], ".npz"
    if kind == "huge-field":
        return f"{header}\n{'9' * 200_000},{row.split(',', 1)[1]}\n".encode(), ".csv"
    if kind == "long-line":
        return f"{header}\n{token}{',1' * 100_000}\n".encode(), ".csv"
    if kind == "many-columns":
        return (",".join([token] * 100_000) + "\n").encode(), ".csv"
    if kind == "out-of-range":
        x[int(rng.integers(n)), int(rng.integers(64))] = rng.choice([1e30, -1e30, 2.0, -0.5, 1.0000001, 255.0, 1e-3 - 1])
        if rng.random() < 0.5:
            return npz(x=x.astype(np.float64), y=y), ".npz"
        return (header + "\n" + "\n".join(",".join(map(repr, [*r.tolist(), int(l)])) for r, l in zip(x.astype(np.float64), y))).encode(), ".csv"
    if kind == "nan":
        x[0, int(rng.integers(64))] = rng.choice([np.nan, np.inf, -np.inf])
        return (npz(x=x, y=y), ".npz") if rng.random() < 0.5 else (f"{header}\n{row.replace('0.5', 'nan', 1)}\n".encode(), ".csv")
    if kind == "nan-label":
        return npz(x=x, y=np.where(np.arange(n) == 0, np.nan, y.astype(float))), ".npz"
    if kind == "truncated":
        whole = npz(x=x, y=y) if rng.random() < 0.5 else npz_compressed(x=x, y=y)
        return whole[: int(rng.integers(1, len(whole)))], ".npz"
    if kind == "dtype":
        bad_x = rng.choice(["int16", "int64", "complex64", "bool", "U3", "structured"])
        if bad_x == "structured":
            return npz(x=np.zeros(n, dtype=[(token, "<f4"), ("b", "<f4")]), y=y), ".npz"
        return npz(x=x.astype(bad_x), y=y), ".npz"
    if kind == "label-dtype":
        return npz(x=x, y=y.astype(rng.choice(["U1", "complex64"]))), ".npz"
    if kind == "shape":
        options = [x.reshape(n, 8, 8)[:, :7], np.zeros((n, 65), np.float32), x[:, 0], np.zeros((0, 64), np.float32)]
        choice = int(rng.integers(len(options) + 2))
        if choice == len(options):
            return npz(x=x, y=np.zeros(n + 1, np.int64)), ".npz"
        if choice == len(options) + 1:
            return npz(x=x, y=np.zeros((n, 2), np.int64)), ".npz"
        return npz(x=options[choice], y=np.zeros(len(options[choice]), np.int64)), ".npz"
    if kind == "labels":
        y[0] = rng.choice([CLASSES, -1, 2**40])
        return (npz(x=x, y=y) if rng.random() < 0.5 else npz(x=x, y=y.astype(float) + 0.5)), ".npz"
    if kind == "objects":
        choice = int(rng.integers(3))
        trap = np.array([Trap(trap_marker(token))] * n, dtype=object)
        if choice == 0:
            return npz(x=x, y=trap), ".npz"
        if choice == 1:
            return pickle.dumps({"x": x, "y": trap}), ".npz"
        buffer = io.BytesIO()
        np.save(buffer, trap, allow_pickle=True)
        return buffer.getvalue(), ".npz"
    if kind == "empty":
        return rng.choice([b"", b"  \n\n", b"\n"]), str(rng.choice([".npz", ".csv"]))
    if kind == "not-data":
        return bytes(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8)), str(rng.choice([".npz", ".csv"]))
    if kind == "members":
        choice = int(rng.integers(3))
        if choice == 0:
            return npz(x=x, **{token: y}), ".npz"  # no y
        if choice == 1:
            return npz(x=x, y=y, **{f"{token}{i}": y for i in range(17)}), ".npz"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=rng.choice([zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])) as archive:
            for name, array in (("x.npy", x), ("y.npy", y)):
                member = io.BytesIO()
                np.save(member, array)
                archive.writestr(name, member.getvalue())
        return buffer.getvalue(), ".npz"
    if kind == "csv-structure":
        options = [f"{token},p1\n1,2\n", f"{header}\n{row},1\n", f"{header}\n{row.replace('0.5', token, 1)}\n",
                   f"{header},label\n{row},1\n", f"{header}\n{'1' * 100},{row.split(',', 1)[1]}\n", f"{header}\n\"0.5\"{row[3:]}\n", header + "\n",
                   bz2.compress(b"label\n1\n").decode("latin-1")]
        return options[int(rng.integers(len(options)))].encode("utf-8", "surrogateescape"), ".csv"
    raise ValueError(kind)


BAD = ("bomb", "huge-field", "long-line", "many-columns", "out-of-range", "nan", "nan-label", "truncated", "dtype",
       "label-dtype", "shape", "labels", "objects", "empty", "not-data", "members", "csv-structure")
LINKS = ("link-secret", "link-outside-data", "link-environ", "link-folder", "link-dangling", "hardlink-outside",
         "fifo")
IGNORED = ("hidden", "unfinished", "other-ending", "link-other-ending")


def _linker(kind: str) -> Callable[[Path, Canaries], None]:
    def put(path: Path, canaries: Canaries) -> None:
        if kind == "hardlink-outside":
            os.link(canaries.outside_npz, path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            target = {"link-secret": canaries.secret_file, "link-outside-data": canaries.outside_npz,
                      "link-environ": "/proc/self/environ", "link-folder": canaries.root,
                      "link-dangling": canaries.root / "missing.npz", "link-other-ending": canaries.secret_file}[kind]
            os.symlink(target, path)
    return put


def _writer(content: bytes) -> Callable[[Path, Canaries], None]:
    return lambda path, canaries: path.write_bytes(content)


odd_names = st.one_of(
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=12),
    st.binary(max_size=12).map(lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\x00", b"_"))),
    st.sampled_from(["new\nline", "fake\n2024-01-01 WARNING quarantined nothing", "\x1b[31mred", "rtl\u202egpj",
                     "tab\there", "n" * 240, " spaces ", "UPPER"]),
)


@st.composite
def entry(draw, index: int, token: str, bomb_bytes: tuple[bytes, ...]) -> Entry:
    group = draw(st.sampled_from(["good"] * 4 + ["bad"] * 4 + ["link"] + ["ignored"]))
    kind = draw(st.sampled_from({"good": GOOD, "bad": BAD, "link": LINKS, "ignored": IGNORED}[group]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    odd = draw(odd_names)
    x = y = None
    if group == "good":
        content, x, y, suffix = _good(kind, rng)
        put = _writer(content)
    elif group == "bad":
        content, suffix = _bad(kind, rng, token, bomb_bytes)
        put = _writer(content)
    elif kind in ("hidden", "unfinished", "other-ending"):
        content, _ = _bad("nan", rng, token, bomb_bytes)
        put, suffix = _writer(content), ".npz"
    else:
        put, suffix = _linker(kind), (".txt" if kind == "link-other-ending" else str(rng.choice([".npz", ".csv", ".NPZ"])))
    if group == "good" and rng.random() < 0.2:
        suffix = suffix.upper()
    name = _fit(f"{index:03d}-{odd}", 250 - len(suffix)) + suffix
    if kind == "hidden":
        name = "." + name[1:]
    elif kind == "unfinished":
        name = _fit(name, 245) + str(rng.choice([".tmp", ".part", ".partial"]))
    elif kind == "other-ending":
        name = _fit(name, 245) + ".json"
    return Entry(kind, name, "ignored" if group == "ignored" else ("good" if group == "good" else "bad"), put, x, y)


def _fit(name: str, limit: int) -> str:
    return os.fsdecode(os.fsencode(name)[:limit])


def batches(token: str, bomb_bytes: tuple[bytes, ...], max_size: int = 20):
    """Lists of entries with distinct names, to put in one inbox together."""
    return st.integers(1, max_size).flatmap(
        lambda size: st.tuples(*[entry(i, token, bomb_bytes) for i in range(size)]).map(list))


def put_all(inbox: Path, entries: list[Entry], canaries: Canaries) -> None:
    for i, item in enumerate(entries):
        item.put(inbox / item.name, canaries)
        os.utime(inbox / item.name, ns=(10**9 * (1000 + i),) * 2, follow_symlinks=False)  # arrival order


def _sorted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = sorted(range(len(y)), key=lambda i: (int(y[i]), x[i].tobytes()))
    return x[order], y[order]


def check(inbox: Path, entries: list[Entry], trained_x: np.ndarray, trained_y: np.ndarray, texts: list[str],
          canaries: Canaries, ordered: bool = True) -> list[tuple[str, str]]:
    """Every broken promise of one batch, as (what, detail): good files trained (exactly their
    samples; in order unless not ``ordered``, e.g. as a replay memory holds them), bad ones quarantined with a short private reason, ignored ones left
    alone, no secret in ``texts`` (log lines) or a reason, no outside sample trained, no pickle
    loaded, no log line forged, nothing outside the inbox moved."""
    problems = []
    good = [e for e in entries if e.expected == "good"]
    expected_x = np.concatenate([e.x for e in good]) if good else np.zeros((0, *SHAPE), np.float32)
    expected_y = np.concatenate([e.y for e in good]) if good else np.zeros(0, np.int64)
    if not ordered:
        (trained_x, trained_y), (expected_x, expected_y) = _sorted(trained_x, trained_y), _sorted(expected_x, expected_y)
    if trained_x.shape != expected_x.shape or not np.array_equal(trained_x, expected_x) \
            or not np.array_equal(trained_y, expected_y):
        problems.append(("trained", f"trained {len(trained_x)} samples, expected the {len(expected_x)} of the good files"))
    if len(trained_x) and (trained_x.reshape(len(trained_x), -1) == OUTSIDE_PIXEL).all(axis=1).any():
        problems.append(("outside", "trained on samples from outside the inbox"))
    quarantine = inbox / "quarantine"
    held = sorted(os.listdir(quarantine)) if quarantine.is_dir() else []
    reasons = [name for name in held if name.endswith(".reason.txt")]
    bad = [e for e in entries if e.expected == "bad"]
    if len(reasons) != len(bad) or len(held) != 2 * len(bad):
        problems.append(("quarantined", f"{len(bad)} bad files, quarantine holds {len(held) - len(reasons)} files "
                                        f"and {len(reasons)} reasons"))
    texts = list(texts)
    for name in reasons:
        text = (quarantine / name).read_text()
        if stat.S_IMODE(os.lstat(quarantine / name).st_mode) != 0o600 or not 0 < len(text) <= 301:
            problems.append(("quarantined", f"reason {name!r} is not private or not of a sane length"))
        texts.append(text)
    for item in entries:
        here = os.path.lexists(inbox / item.name)
        if item.expected == "bad" and here:
            problems.append(("quarantined", f"bad file {item.kind} {item.name!r} is still in the inbox"))
        if item.expected != "bad" and not here:
            problems.append(("left", f"{item.expected} file {item.kind} {item.name!r} left the inbox"))
    if any(canaries.token in text for text in texts):
        problems.append(("outside", "a secret from outside the inbox (or a file's bytes) reached a log line or reason"))
    if any(ch in line for line in texts[: len(texts) - len(reasons)] for ch in "\n\r\x1b\u202e"):
        problems.append(("forged", "a log line holds a newline or control character"))
    if canaries.marker.exists():
        problems.append(("pickle", "a pickle was loaded"))
    if not canaries.secret_file.is_file() or not canaries.outside_npz.is_file():
        problems.append(("outside", "a file outside the inbox was moved"))
    return problems
