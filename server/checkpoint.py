"""Checkpoints of a run, written after every completed round, so a crashed server loses no
finished work.

A checkpoint is two files in ``RUN_DIR/checkpoints/``: ``round-000012.safetensors`` (every
tensor: the global model, the strategy's server-optimizer state, torch's and numpy's RNG
states) and ``round-000012.json`` (the rest: round, task, Python's ``random`` state, the drift
response, the run's settings, the order of the tensors, and the sha256 of both files), plus
the journal that all checkpoints share: one line per finished round, appended (and synced)
before the checkpoint of that round is written. A checkpoint names how many journal lines are
its history, with their byte count and sha256, so that saving round N costs the same at round
10 as at round 10,000 (a history stored in every checkpoint made a long run write quadratic
bytes).

A simulation's nodes' states (``context.state``: replay memories, method state) go to node
packs, shared the same way: a round's checkpoint writes ``nodes-000012.safetensors`` with
the states of the nodes sent a message since the checkpoint before, and names, for every
node, the pack that holds its newest state, with each pack's sha256. A round of 100 sampled
clients out of 10,000 writes 100 states, not 10,000. The next checkpoint writes every
node's state into one pack again when no pack in use holds every node's (the first, and after
resuming a checkpoint of format 3 or older), when the other packs in use add up to that
pack's size, when the packs in use number ``MAX_PACKS``, or after a pack was read from its
copy. Each pack is written twice (``.copy``), as the journal is, since many checkpoints
need it.

Every checkpoint needs every line of the journal before its own, so the journal is written
twice (``history.jsonl`` and ``history-copy.jsonl``) and each line carries its index and a
checksum of its own: a line damaged in one file is read from the other (with a warning), and
only a round whose line is damaged in both costs the checkpoints that need it. The tensors
file is written first and the JSON last, each atomically, so a checkpoint whose JSON exists
is complete; a damaged one (bad checksum, truncated, unreadable, a journal that no longer
holds its rounds) is skipped for the one before it. The last ``KEEP`` are kept, and the
packs they name. The folder is private to its owner (0700, files 0600): a simulation's
checkpoints hold its clients' replay memories. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from common.errors import FedtideError
from common.files import append_synced, write_bytes_atomic

CHECKPOINT_FOLDER = "checkpoints"
JOURNAL = "history.jsonl"
JOURNAL_COPY = "history-copy.jsonl"
KEEP = 3
FORMAT = 4  # 3: the nodes' states inside every checkpoint; 2: one journal of bare lines, no copy (both still read)
READABLE = (1, 2, 3, FORMAT)
LEGACY_FORMAT = 1  # the history inside every checkpoint; still read, so older runs resume
PRIVATE_FILE, PRIVATE_FOLDER = 0o600, 0o700
_NAME = re.compile(r"^round-(\d{6})\.json$")
_PACK_FILE = re.compile(r"(nodes-[0-9]{6}\.safetensors)(\.copy)?")  # fullmatch: exactly what fedtide writes
MAX_PACKS = 64


class JournalEntry(Protocol):
    def as_json(self) -> dict[str, Any]: ...


@dataclass
class Checkpoint:
    """Named tensors (``model/``, ``strategy/``, ``rng/`` prefixes; ``node/<id>/`` in format 3 and older) and
    JSON-able metadata; ``meta["order"]`` keeps each group's key order (safetensors sorts).
    ``journal``: the run's history so far, one entry per round, oldest first (entries with
    ``as_json()`` when saving; the loaded dicts after ``load``). ``nodes``: simulated nodes'
    states, when the run has them: when saving, those of the nodes sent a message since the
    checkpoint before, or every node's when ``CheckpointStore.full_nodes_next`` asks for them;
    after ``load``, every node's."""

    server_round: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    journal: Sequence[Any] = field(default_factory=list)
    nodes: dict[int, dict[str, torch.Tensor]] | None = None
    repaired: bool = False  # a node pack was read from its copy

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix/``, without it, in the order they were saved."""
        return {key: self.tensors[f"{prefix}/{key}"] for key in self.meta["order"].get(prefix, [])}

    @classmethod
    def build(
        cls, server_round: int, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
        journal: Sequence[JournalEntry] = (), nodes: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> "Checkpoint":
        tensors: dict[str, torch.Tensor] = {}
        order: dict[str, list[str]] = {}
        for prefix, group in groups.items():
            order[prefix] = list(group)
            for key, tensor in group.items():
                tensors[f"{prefix}/{key}"] = _own_copy(tensor)
        return cls(server_round, tensors, {**meta, "round": server_round, "order": order}, journal, nodes)


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy sharing no memory (safetensors refuses tensors that share memory)."""
    return tensor.detach().to("cpu").clone().contiguous()


def _pack_name(server_round: int) -> str:
    return f"nodes-{server_round:06d}.safetensors"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _frame(index: int, text: str) -> str:
    """A journal line: its index and a checksum of both, so that it vouches for itself."""
    return f"{index} {_sha256(f'{index} {text}'.encode())[:16]} {text}\n"


def _journal_lines(path: Path, wanted: int, bare: bool) -> dict[int, str]:
    """The entries (JSON text by index) among the first ``wanted`` of the journal ``path``
    whose lines are intact; {} when it is missing or unreadable. With ``bare``, a line as
    format 2 wrote it (no index, no checksum) stands at its position, checked only with the
    whole (by the checkpoint's hash)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read()
    except OSError:
        return {}
    found: dict[int, str] = {}
    for position, line in enumerate(raw.split(b"\n")[:-1]):  # a last line without its newline is partial
        text = line.decode("utf-8", "replace")
        if bare and text.startswith("{"):
            found.setdefault(position, text)
            continue
        index, _, rest = text.partition(" ")
        checksum, _, entry = rest.partition(" ")
        if index.isdigit() and int(index) < wanted and _sha256(f"{index} {entry}".encode())[:16] == checksum:
            found.setdefault(int(index), entry)
    return found


def _pack_afresh(packs: dict[str, dict[str, Any]]) -> bool:
    """Whether the next checkpoint should pack every node's state again: no pack in use holds
    every node's, they number ``MAX_PACKS``, or the other packs in use add up to the size of
    the one that does (so the packs a checkpoint needs stay within twice a whole pack)."""
    full = [r["bytes"] for r in packs.values() if r.get("every")]
    return not full or len(packs) >= MAX_PACKS or sum(r["bytes"] for r in packs.values()) > 2 * full[-1]


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (its first 8 bytes give the header's length)."""
    size = int.from_bytes(data[:8], "little")
    if not 0 < size <= len(data) - 8:
        raise ValueError("a node pack's header is cut short")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})


def _spans(rounds: list[int]) -> str:
    """``[2, 3, 4, 9]`` as ``2-4, 9``."""
    spans: list[list[int]] = []
    for value in rounds:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class CheckpointStore:
    """The checkpoints folder of one run folder."""

    def __init__(self, run_dir: Path, keep: int = KEEP) -> None:
        self.folder = Path(run_dir) / CHECKPOINT_FOLDER
        self.keep = keep
        self.journal_path = self.folder / JOURNAL
        self._journal_lines = 0  # what this store has written to the journal, or found valid there
        self._journal_bytes = 0
        self._journal_hash = hashlib.sha256()
        self._packs: dict[str, dict[str, Any]] = {}  # pack -> sha256, bytes and the nodes whose newest state it holds
        self.full_nodes_next = True  # the next save needs every node's state (no packs in use yet, or too many)

    def _paths(self, server_round: int) -> tuple[Path, Path]:
        stem = self.folder / f"round-{server_round:06d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def _journals(self) -> tuple[Path, Path]:
        return self.journal_path, self.folder / JOURNAL_COPY

    def meta_path(self, server_round: int) -> Path:
        """The JSON file of ``server_round``'s checkpoint (read it through ``load`` to have it checked)."""
        return self._paths(server_round)[1]

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint JSON, newest first (not yet checked)."""
        if not self.folder.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.folder.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def newest_meta(self) -> dict[str, Any]:
        """The metadata of the newest checkpoint whose JSON reads, unchecked ({} when none):
        for a quick look before a run starts; ``load`` checks a checkpoint properly."""
        for server_round in self.rounds():
            try:
                return dict(json.loads(self.meta_path(server_round).read_text(encoding="utf-8"))["checkpoint"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return {}

    def _make_folder(self) -> None:
        self.folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        self.folder.chmod(PRIVATE_FOLDER)  # also a folder made by an older fedtide, or under a loose umask

    def save(self, checkpoint: Checkpoint) -> Path:
        from safetensors.torch import save

        self._make_folder()
        journal = self._append_journal(checkpoint.journal)
        tensors_path, meta_path = self._paths(checkpoint.server_round)
        packs = self._save_nodes(checkpoint) if checkpoint.nodes is not None else None
        data = save(checkpoint.tensors, metadata={"format": str(FORMAT)})
        write_bytes_atomic(tensors_path, data, mode=PRIVATE_FILE)
        body = {
            **checkpoint.meta, "format": FORMAT, "tensors_sha256": _sha256(data), "tensors_bytes": len(data),
            "journal": journal, "node_packs": packs,
        }
        text = json.dumps(body, sort_keys=True)
        document = json.dumps({"sha256": _sha256(text.encode()), "checkpoint": body}) + "\n"
        write_bytes_atomic(meta_path, document.encode(), mode=PRIVATE_FILE)
        self._prune()
        return meta_path

    def _save_nodes(self, checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
        """Write the changed nodes' states as this round's pack (and its copy); return the packs
        in use, each with the nodes whose newest state it holds."""
        from safetensors.torch import save

        changed = checkpoint.nodes or {}
        if changed:
            name = _pack_name(checkpoint.server_round)
            tensors = {f"{node}/{key}": _own_copy(t) for node, state in changed.items() for key, t in state.items()}
            order = json.dumps({str(node): list(state) for node, state in changed.items()})
            data = save(tensors, metadata={"format": str(FORMAT), "order": order})
            for path in self._pack_paths(name):
                write_bytes_atomic(path, data, mode=PRIVATE_FILE)
            packs = {}
            for pack, record in self._packs.items():  # an older pack keeps the nodes that did not change
                rest = [node for node in record["nodes"] if node not in changed]
                if rest:
                    packs[pack] = {**record, "nodes": rest}
            every = len(packs) == 0  # no older pack holds a newest state: this one holds every node's
            packs[name] = {"sha256": _sha256(data), "bytes": len(data), "nodes": sorted(changed), "every": every}
            self._packs = packs
        held = {node for record in self._packs.values() for node in record["nodes"]}
        if held != set(checkpoint.meta.get("nodes") or ()):  # a caller's mistake: a checkpoint that could not resume
            raise ValueError(f"round {checkpoint.server_round}'s node packs would hold {len(held)} nodes' states, "
                             f"not the {len(checkpoint.meta.get('nodes') or ())} it lists: pass every node's state")
        self.full_nodes_next = _pack_afresh(self._packs)
        return {pack: dict(record) for pack, record in self._packs.items()}

    def _pack_paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / name, self.folder / f"{name}.copy"

    def _load_nodes(self, packs: Any, nodes: Any) -> tuple[dict[int, dict[str, torch.Tensor]], list[str]]:
        """Every node's state from the packs a checkpoint names, and the packs read from their
        copies; ValueError says what is wrong."""
        from safetensors.torch import load

        if not isinstance(packs, dict) or not isinstance(nodes, list):
            raise ValueError("its node packs are not a mapping")
        states: dict[int, dict[str, torch.Tensor]] = {}
        repaired = []
        for name, record in packs.items():
            if not isinstance(name, str) or not (match := _PACK_FILE.fullmatch(name)) or match.group(2) \
                    or not isinstance(record, dict):
                raise ValueError(f"it names a node pack {str(name)[:40]!r} that fedtide does not write")
            data = None
            for path in self._pack_paths(name):
                try:
                    candidate = path.read_bytes()
                except OSError:
                    continue
                if len(candidate) == record.get("bytes") and _sha256(candidate) == record.get("sha256"):
                    data = candidate
                    break
            if data is None:
                raise ValueError(f"{name} and its copy are both lost or damaged")
            if path.name != name:
                repaired.append(name)
            order = json.loads(_safetensors_metadata(data)["order"])
            tensors = load(data)
            for node in record["nodes"]:
                if not isinstance(node, int) or isinstance(node, bool) or node in states:
                    raise ValueError(f"{name} is named for node {str(node)[:20]!r}: not a node id, or a second time")
                states[node] = {key: tensors[f"{node}/{key}"] for key in order[str(node)]}
        if set(states) != set(nodes) or len(nodes) != len(set(nodes)):
            missing, extra = sorted(set(nodes) - set(states)), sorted(set(states) - set(nodes))
            raise ValueError(f"its node packs hold the states of other nodes than it lists (missing "
                             f"{_spans(missing[:20]) or 'none'}, extra {_spans(extra[:20]) or 'none'})")
        return states, repaired

    def _append_journal(self, entries: Sequence[JournalEntry]) -> dict[str, Any]:
        """Append the entries this store has not written yet (normally one round's) to the
        journal (synced to disk) and its copy; return what a checkpoint records of the
        journal: its entries' lines, bare (as format 2 wrote them), counted and hashed."""
        if len(entries) < self._journal_lines:
            raise ValueError(f"the history has {len(entries)} rounds, the journal already {self._journal_lines}")
        texts = [json.dumps(e.as_json()) for e in entries[self._journal_lines :]]
        if texts or not self.journal_path.exists():
            framed = "".join(_frame(self._journal_lines + i, t) for i, t in enumerate(texts)).encode()
            journal, copy = self._journals()
            append_synced(journal, framed, mode=PRIVATE_FILE)
            # unsynced: only a power cut loses it, and history.jsonl (synced) still has those lines
            append_synced(copy, framed, mode=PRIVATE_FILE, sync=False)
            bare = "".join(t + "\n" for t in texts).encode()
            self._journal_hash.update(bare)
            self._journal_bytes += len(bare)
            self._journal_lines = len(entries)
        return {"lines": self._journal_lines, "bytes": self._journal_bytes, "sha256": self._journal_hash.hexdigest()}

    def _read_journal(self, record: dict[str, Any], warn: Callable[[str], None], bare: bool) -> list[dict[str, Any]]:
        """The journal's first ``record["lines"]`` entries, checked against the checkpoint;
        a line damaged in ``history.jsonl`` is taken from its copy, with a ``warn``ing.
        ``bare``: the checkpoint is of format 2, whose journal may still be unframed."""
        wanted = int(record["lines"])
        journal, copy = (_journal_lines(path, wanted, bare) for path in self._journals())
        texts, repaired = [], []
        for index in range(wanted):
            text = journal.get(index, copy.get(index))
            if text is None:
                raise ValueError(f"{JOURNAL} and {JOURNAL_COPY} both lost or damaged the line of round {index + 1}")
            if index not in journal:
                repaired.append(index + 1)
            texts.append(text)
        data = "".join(t + "\n" for t in texts).encode()
        if len(data) != record["bytes"] or _sha256(data) != record["sha256"]:
            raise ValueError(f"{JOURNAL} no longer holds this checkpoint's {wanted} rounds (truncated or changed)")
        if repaired:
            warn(f"{JOURNAL} lost or damaged the line of round(s) {_spans(repaired)}; read from {JOURNAL_COPY}")
        return [json.loads(text) for text in texts]

    def continue_after(self, checkpoint: Checkpoint) -> None:
        """Make the journal hold exactly ``checkpoint``'s history (a crash may have left a
        round or a partial line after it, a line may have been repaired from the copy, an
        older fedtide may have written it without a copy), so that the run goes on from there;
        take on its node packs (and whether the next save must pack every node afresh)."""
        texts = [json.dumps(entry) for entry in checkpoint.journal]
        framed = "".join(_frame(i, t) for i, t in enumerate(texts)).encode()
        self._make_folder()
        for path in self._journals():
            write_bytes_atomic(path, framed, mode=PRIVATE_FILE)
        bare = "".join(t + "\n" for t in texts).encode()
        self._journal_lines, self._journal_bytes, self._journal_hash = len(texts), len(bare), hashlib.sha256(bare)
        packs = checkpoint.meta.get("node_packs")  # None: no nodes, or a checkpoint of format 3 or older
        self._packs = {name: dict(record) for name, record in packs.items()} if isinstance(packs, dict) else {}
        # a pack read from its copy is left with one good file: the next checkpoint needs none of them
        self.full_nodes_next = _pack_afresh(self._packs) or checkpoint.repaired

    def clear(self) -> None:
        """Remove every checkpoint, the journal and the node packs: a new run in this folder
        must not resume an older one."""
        for server_round in self.rounds():
            for path in self._paths(server_round):
                path.unlink(missing_ok=True)
        for path in self._journals():
            path.unlink(missing_ok=True)
        self._journal_lines, self._journal_bytes, self._journal_hash = 0, 0, hashlib.sha256()
        self._remove_packs(keep=set())
        self._packs, self.full_nodes_next = {}, True

    def _prune(self) -> None:
        for server_round in self.rounds()[self.keep:]:
            for path in self._paths(server_round):
                path.unlink(missing_ok=True)
        used: set[str] = set()
        for server_round in self.rounds():
            try:
                packs = json.loads(self.meta_path(server_round).read_text(encoding="utf-8"))["checkpoint"].get("node_packs")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return  # a checkpoint that does not read might still need any pack
            if packs is not None and not isinstance(packs, dict):
                return
            used.update(packs or {})
        self._remove_packs(keep=used)

    def _remove_packs(self, keep: set[str]) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            match = _PACK_FILE.fullmatch(path.name)
            if match and match.group(1) not in keep:
                path.unlink(missing_ok=True)

    def load(self, server_round: int, warn: Callable[[str], None] = lambda message: None) -> Checkpoint:
        """The checkpoint of ``server_round``; ValueError says why it cannot be used. A
        journal line or node pack read from its copy is reported with ``warn``."""
        tensors_path, meta_path = self._paths(server_round)
        try:
            document = json.loads(meta_path.read_text(encoding="utf-8"))
            body = document["checkpoint"]
            text = json.dumps(body, sort_keys=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path.name} is unreadable ({err})") from None
        if document.get("sha256") != _sha256(text.encode()):
            raise ValueError(f"{meta_path.name} fails its checksum")
        if body.get("format") not in READABLE:
            raise ValueError(
                f"{meta_path.name} has format {body.get('format')}, this fedtide reads {FORMAT}: "
                "resume it with the fedtide version that started it"
            )
        try:
            data = tensors_path.read_bytes()
        except OSError as err:
            raise ValueError(f"{tensors_path.name} is unreadable ({err.strerror or err})") from None
        from safetensors import SafetensorError

        try:
            return self._read(body, data, tensors_path.name, warn)
        except ValueError as err:
            raise ValueError(f"{meta_path.name}: {err}") from None
        except (KeyError, TypeError, AttributeError) as err:  # checksummed, yet not what fedtide writes
            raise ValueError(f"{meta_path.name} lacks or misstates a field ({err!r:.80})") from None
        except SafetensorError as err:  # a checksummed file that does not parse
            raise ValueError(f"{meta_path.name}: a tensors file does not parse ({str(err)[:80]})") from None

    def _read(self, body: dict[str, Any], data: bytes, tensors_name: str, warn: Callable[[str], None]) -> Checkpoint:
        """The checkpoint of a JSON body whose checksum held, and of its tensors file's bytes."""
        from safetensors.torch import load

        if len(data) != body["tensors_bytes"] or _sha256(data) != body["tensors_sha256"]:
            raise ValueError(f"{tensors_name} fails its checksum (truncated or damaged)")
        if body["format"] == LEGACY_FORMAT:
            history = body["history"]
            body = {**body, "baseline": history["baseline"], "journal": None}
            return Checkpoint(int(body["round"]), load(data), body, list(history["rounds"]))
        journal = self._read_journal(body["journal"], warn, bare=body["format"] == 2)
        nodes, repaired = None, False
        if body["format"] >= 4 and body.get("nodes") is not None:
            nodes, repaired = self._load_nodes(body.get("node_packs"), body["nodes"])
            if repaired:
                warn(f"node pack(s) {', '.join(repaired)} lost or damaged; read from their copies")
        return Checkpoint(int(body["round"]), load(data), body, journal, nodes, repaired=bool(repaired))

    def latest(self, warn: Callable[[str], None]) -> Checkpoint:
        """The newest usable checkpoint; each damaged newer one is reported with ``warn``.
        FedtideError when there is none."""
        rounds = self.rounds()
        if not rounds:
            raise FedtideError(
                f"{self.folder.parent} holds no checkpoints ({CHECKPOINT_FOLDER}/round-*.json): "
                "it is not a fedtide run folder, or its run stopped before its first round was evaluated"
            )
        problems = []
        for server_round in rounds:
            try:
                return self.load(server_round, warn)
            except ValueError as err:
                problems.append(str(err))
                warn(f"checkpoint of round {server_round} is not usable: {err}; trying the one before")
        raise FedtideError(f"no usable checkpoint in {self.folder}: {'; '.join(problems)}")
