"""Fleet membership while the server runs: `fedtide certs --add-node` adds one key pair and
touches nothing else, `fedtide nodes list/revoke` show and revoke members, a running server
registers and unregisters keys as the certificate folder changes and records node ids. Fast
in-process tests (the SuperLink's CLI replaced by a fake), fuzz of names and registry files,
and one real loopback federation (marked slow)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.errors import FedtideError
from fedtide.cli import main
from fedtide.deployment import membership
from fedtide.deployment.cert_files import CertificateSet, node_keys_in
from fedtide.deployment.nodes import node_table
from fedtide.deployment.membership import (
    FleetMembership, Registered, load_registry, load_run_nodes, registry_path, save_registry, write_run_nodes,
)
from loopback import Session, digits_arrays, drop_file, free_port, wait_for


def _federation(tmp_path, nodes: int = 2):
    folder = tmp_path / "certs"
    assert main(["certs", "--out", str(folder), "--server-name", "localhost", "--nodes", str(nodes)]) == 0
    return folder


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in folder.rglob("*") if p.is_file()}


def test_add_node_writes_one_key_pair_and_changes_nothing_else(tmp_path, capsys):
    folder = _federation(tmp_path)
    before = _hashes(folder)
    assert main(["certs", "--out", str(folder), "--add-node", "node-3"]) == 0
    assert "node-3.key" in capsys.readouterr().out
    after = _hashes(folder)
    assert {name: after[name] for name in before} == before  # CA, server certificate, other keys untouched
    assert sorted(set(after) - set(before)) == ["node-3.key", "node-3.pub"]
    assert after["node-3.key"][1] & 0o777 == 0o600 and after["node-3.pub"][1] & 0o777 == 0o644
    public = load_ssh_public_key((folder / "node-3.pub").read_bytes())
    private = load_ssh_private_key((folder / "node-3.key").read_bytes(), password=None)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert [k.name for k in CertificateSet(folder).active_nodes()] == ["node-1", "node-2", "node-3"]


@pytest.mark.parametrize("name", [
    "../x", "x/y", "/etc/passwd", "..", ".hidden", "Node-3", "node_3", "node 3", "nöde", "-a", "a-", "", "a" * 33,
    "ca", "server", "revoked", "node-3\n", "node-3\x00",
])
def test_add_node_refuses_a_bad_name_in_one_line_and_writes_nothing(tmp_path, capsys, name):
    folder = _federation(tmp_path)
    before = _hashes(folder)
    assert main(["certs", "--out", str(folder), f"--add-node={name}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not allowed" in err[0]
    assert _hashes(folder) == before and not (tmp_path / "x").exists()


def test_add_node_refuses_a_taken_name_a_revoked_name_and_a_folder_without_a_federation(tmp_path, capsys):
    folder = _federation(tmp_path)
    assert main(["certs", "--out", str(folder), "--add-node", "node-2"]) == 2
    assert "node name node-2 is taken" in capsys.readouterr().err
    assert main(["nodes", "revoke", "--certs", str(folder), "node-1"]) == 0
    (folder / "node-1.key").unlink()
    assert main(["certs", "--out", str(folder), "--add-node", "node-1"]) == 2
    assert "revoked/node-1.pub" in capsys.readouterr().err
    assert main(["certs", "--out", str(tmp_path / "empty"), "--add-node", "node-1"]) == 2
    assert "holds no federation" in capsys.readouterr().err and not (tmp_path / "empty" / "node-1.key").exists()
    assert main(["certs", "--out", str(folder), "--add-node", "node-9", "--force"]) == 2
    assert "drop --force" in capsys.readouterr().err


def test_a_new_federation_still_needs_a_server_name(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "c")]) == 2
    assert "--server-name HOST is required" in capsys.readouterr().err


def test_revoke_moves_the_public_key_to_revoked_and_list_shows_every_node(tmp_path, capsys):
    folder = _federation(tmp_path, nodes=3)
    key = (folder / "node-2.pub").read_bytes()
    assert main(["nodes", "revoke", "--certs", str(folder), "node-2"]) == 0
    assert not (folder / "node-2.pub").exists() and (folder / "revoked" / "node-2.pub").read_bytes() == key
    capsys.readouterr()
    assert main(["nodes", "list", "--certs", str(folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["name", "status", "fingerprint", "node", "id", "online"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == [("node-1", "active"), ("node-3", "active"), ("node-2", "revoked")]
    prints = {k.name: k.fingerprint for k in node_keys_in(folder / "revoked") + node_keys_in(folder)}
    assert all(r[2] == prints[r[0]] and r[2].startswith("SHA256:") for r in rows)


@pytest.mark.parametrize("name, words", [
    ("node-9", "has no node node-9"), ("../ca", "is not allowed"), ("node-1", "is already revoked"),
])
def test_revoke_refuses_unknown_bad_and_revoked_names(tmp_path, capsys, name, words):
    folder = _federation(tmp_path)
    assert main(["nodes", "revoke", "--certs", str(folder), "node-1"]) == 0
    capsys.readouterr()
    before = _hashes(folder)
    assert main(["nodes", "revoke", "--certs", str(folder), name]) == 2
    assert words in capsys.readouterr().err
    assert _hashes(folder) == before


def test_keys_that_are_links_oversized_or_not_keys_are_no_nodes(tmp_path):
    folder = _federation(tmp_path, nodes=1)
    (folder / "linked.pub").symlink_to(folder / "node-1.pub")
    (folder / "big.pub").write_bytes((folder / "node-1.pub").read_bytes() + b"#" * 5000)
    (folder / "junk.pub").write_text("ssh-rsa AAAA not-a-key\n")
    (folder / "Bad_Name.pub").write_bytes((folder / "node-1.pub").read_bytes())
    (folder / "dir.pub").mkdir()
    assert [k.name for k in CertificateSet(folder).active_nodes()] == ["node-1"]


def _fake_database(path, rows):
    """A SuperLink-like node table: (node id as stored, a signed int64, status, online until, key bytes)."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE node (node_id INTEGER, status TEXT, online_until REAL, public_key BLOB)")
        db.executemany("INSERT INTO node VALUES (?, ?, ?, ?)", rows)


def test_list_shows_node_ids_from_the_registry_and_online_state_from_the_database(tmp_path, capsys):
    folder = _federation(tmp_path, nodes=2)
    keys = {k.name: k for k in CertificateSet(folder).active_nodes()}
    database = tmp_path / "superlink.db"
    big_id = 2**64 - 5  # stored by Flower as the signed int64 -5
    _fake_database(database, [(-5, "online", time.time() + 60, keys["node-1"].flower_bytes()),
                              (77, "offline", time.time() - 5, keys["node-2"].flower_bytes())])
    save_registry(registry_path(database), {"node-1": Registered(big_id, keys["node-1"].fingerprint)})
    membership.note_database(CertificateSet(folder), database)  # what a server does when it starts
    assert main(["nodes", "list", "--certs", str(folder)]) == 0
    rows = {r.split()[0]: r.split() for r in capsys.readouterr().out.strip().splitlines()[1:]}
    assert rows["node-1"][3:] == [str(big_id), "yes"]
    assert rows["node-2"][3:] == ["77", "no"]  # not in the registry: the database knows it


@pytest.mark.parametrize("content", [
    b"{not json", b"[]", b'{"nodes": []}', b'{"nodes": {"../x": {"node-id": "5", "fingerprint": "x"}}}',
    b"[" * 100_000, b'{"nodes": {}}' + b" " * (2 << 20),
])
def test_a_damaged_or_oversized_registry_is_an_empty_one(tmp_path, content):
    path = tmp_path / "db.nodes.json"
    path.write_bytes(content)
    assert load_registry(path) == {}


def test_registry_entries_with_bad_names_ids_or_fingerprints_are_left_out(tmp_path):
    good = "SHA256:" + "A" * 43
    path = tmp_path / "db.nodes.json"
    path.write_text(json.dumps({"nodes": {
        "node-1": {"node-id": "12", "fingerprint": good},
        "node-2": {"node-id": "0", "fingerprint": good}, "node-3": {"node-id": str(2**64), "fingerprint": good},
        "node-4": {"node-id": "-3", "fingerprint": good}, "node-5": {"node-id": "1e3", "fingerprint": good},
        "node-6": {"node-id": "7", "fingerprint": "SHA256:short"}, "node-7": {"node-id": True, "fingerprint": good},
        "../etc": {"node-id": "8", "fingerprint": good}, "node-8": "9", "NODE-9": {"node-id": "9", "fingerprint": good},
    }}))
    assert load_registry(path) == {"node-1": Registered(12, good)}
    link = tmp_path / "linked.nodes.json"
    link.symlink_to(path)
    assert load_registry(link) == {}  # never followed


def test_run_nodes_file_has_the_agreed_format_and_is_read_back_safely(tmp_path):
    write_run_nodes(tmp_path, {2**64 - 1: "node-3", 42: "edge-a"})
    assert json.loads((tmp_path / "nodes.json").read_text()) == {"nodes": {"42": "edge-a", str(2**64 - 1): "node-3"}}
    assert load_run_nodes(tmp_path) == {42: "edge-a", 2**64 - 1: "node-3"}
    (tmp_path / "nodes.json").write_text(json.dumps({"nodes": {"42": "../x", "x": "node-1", "7": "node-7"}}))
    assert load_run_nodes(tmp_path) == {7: "node-7"}


class FakeSuperLink:
    """What `flwr supernode register/unregister` do to a SuperLink's node table."""

    def __init__(self) -> None:
        self.rows: dict[bytes, list] = {}  # public key -> [node id, status]
        self.calls: list[tuple[str, ...]] = []
        self.next_id = 1000

    def cli(self, home, *args, options=()):
        self.calls.append(args)
        if args[:2] == ("supernode", "register"):
            from fedtide.deployment.cert_files import read_node_key
            from pathlib import Path

            key = read_node_key(Path(args[2])).flower_bytes()
            if key in self.rows:
                raise FedtideError("`flwr supernode register` failed: [code: 23] Public key already in use.")
            self.next_id += 1
            self.rows[key] = [self.next_id, "registered"]
            return {"success": True, "node-id": self.next_id}
        if args[:2] == ("supernode", "unregister"):
            for row in self.rows.values():
                if row[0] == int(args[2]) and row[1] != "unregistered":
                    row[1] = "unregistered"
                    return {"success": True}
            raise FedtideError("`flwr supernode unregister` failed: [code: 24] Node ID not found for account.")
        raise AssertionError(args)

    def database(self, path):
        return {key: membership.DatabaseNode(row[0], row[1], None) for key, row in self.rows.items()}

    def active_ids(self) -> set[int]:
        return {row[0] for row in self.rows.values() if row[1] != "unregistered"}


@pytest.fixture
def superlink(monkeypatch):
    fake = FakeSuperLink()
    monkeypatch.setattr(membership, "flwr_cli", fake.cli)
    monkeypatch.setattr(membership, "database_nodes", fake.database)
    return fake


def test_a_running_server_follows_added_and_revoked_keys_and_records_their_ids(tmp_path, superlink):
    folder, run = _federation(tmp_path, nodes=1), tmp_path / "run"
    run.mkdir()
    said: list[str] = []
    fleet = FleetMembership(tmp_path / "home", CertificateSet(folder), tmp_path / "db", run, said.append)
    assert fleet.start() == 1
    node_1 = superlink.active_ids()
    assert json.loads((run / "nodes.json").read_text()) == {"nodes": {str(i): "node-1" for i in node_1}}
    calls = len(superlink.calls)
    fleet.poll(now=time.monotonic() + 10)
    assert len(superlink.calls) == calls  # nothing changed: no Flower command at all
    assert main(["certs", "--out", str(folder), "--add-node", "node-2"]) == 0
    fleet.poll(now=time.monotonic() + 20)
    (node_2,) = superlink.active_ids() - node_1
    assert json.loads((run / "nodes.json").read_text())["nodes"][str(node_2)] == "node-2"
    assert load_registry(tmp_path / "db.nodes.json")["node-2"].node_id == node_2
    assert main(["nodes", "revoke", "--certs", str(folder), "node-2"]) == 0
    fleet.poll(now=time.monotonic() + 30)
    assert superlink.active_ids() == node_1
    assert "node-2" not in load_registry(tmp_path / "db.nodes.json")
    assert json.loads((run / "nodes.json").read_text())["nodes"][str(node_2)] == "node-2"  # past rounds keep a name
    assert any("node node-2 unregistered" in line and "revoked" in line for line in said)


def test_a_restarted_server_knows_ids_in_use_and_revocation_holds_on_the_old_database(tmp_path, superlink):
    folder = _federation(tmp_path, nodes=3)
    certs = CertificateSet(folder)
    FleetMembership(tmp_path / "home", certs, tmp_path / "db", tmp_path, print).start()
    ids = dict(load_registry(tmp_path / "db.nodes.json"))
    # the server is stopped; node-3 is revoked, the registry is lost; the same database is used again
    assert main(["nodes", "revoke", "--certs", str(folder), "node-3"]) == 0
    (tmp_path / "db.nodes.json").write_text("{damaged")
    restarted = FleetMembership(tmp_path / "home", certs, tmp_path / "db", tmp_path, print)
    assert restarted.start() == 2
    assert superlink.active_ids() == {ids["node-1"].node_id, ids["node-2"].node_id}
    again = load_registry(tmp_path / "db.nodes.json")
    assert again == {"node-1": ids["node-1"], "node-2": ids["node-2"]}  # "already in use": ids from the database


def test_a_replaced_key_is_unregistered_and_the_new_one_registered(tmp_path, superlink):
    folder = _federation(tmp_path, nodes=1)
    fleet = FleetMembership(tmp_path / "home", CertificateSet(folder), tmp_path / "db", tmp_path, print)
    fleet.start()
    old = superlink.active_ids()
    assert main(["certs", "--out", str(folder), "--server-name", "localhost", "--nodes", "1", "--force"]) == 0
    fleet.poll(now=time.monotonic() + 10)
    assert len(superlink.active_ids()) == 1 and superlink.active_ids() != old


# --- a real federation on loopback ------------------------------------------------------------

ROUNDS = 7  # node-2 joins within two rounds of its key's arrival; rounds go on after its revocation
ROUND_TIMEOUT = 45


def _rounds(run) -> list[dict]:
    metrics = run / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _rounds_of(run, name: str) -> list[int]:
    path = run / "nodes.json"
    names = json.loads(path.read_text())["nodes"] if path.exists() else {}
    ids = {node for node, named in names.items() if named == name}
    return [r["round"] for r in _rounds(run) if any(str(c["node"]) in ids for c in r["clients"])]


def _id_of(run, name: str) -> str:
    return next(node for node, named in json.loads((run / "nodes.json").read_text())["nodes"].items() if named == name)


def _unregistered_and_refused(superlink_log) -> tuple[float, float]:
    """When the SuperLink unregistered a node and when it first refused a fleet request after
    that (its access log's UTC times, as Unix times)."""
    from datetime import datetime

    unregistered = None
    for line in superlink_log.read_text(errors="replace").splitlines():
        stamp = line.split(" ", 1)[0]
        if unregistered is None and "/v1/control/unregister-node HTTP/1.1\" 200" in line:
            unregistered = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        elif unregistered is not None and "/v1/fleet/" in line and '" 401' in line:
            return unregistered, datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"no unregistration followed by a refusal in {superlink_log}")


@pytest.mark.slow
def test_a_node_added_to_a_running_server_trains_and_a_revoked_one_is_cut_off(tmp_path):
    certs = _federation(tmp_path, nodes=1)
    for i in (1, 2):
        drop_file(tmp_path / f"data-{i}", "batch-0.npz", *digits_arrays(seed=i, count=100))
    run, address = tmp_path / "run", f"127.0.0.1:{free_port()}"

    def client(name: str, *extra: str) -> Session:
        return Session(["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"{name}.key"),
                        "--data", str(tmp_path / f"data-{name[-1]}"), "--state", str(tmp_path / f"state-{name}"), *extra],
                       tmp_path / f"{name}.log", tmp_path)

    sessions = []
    try:
        server = Session(["server", "--certs", str(certs), "--database", str(tmp_path / "superlink.db"), "--out", str(run),
                          "--address", address, "--num-tasks", "1", "--rounds-per-task", str(ROUNDS),
                          "--local-epochs", "1", "--round-timeout", str(ROUND_TIMEOUT)], tmp_path / "server.log", tmp_path)
        sessions += [server, client("node-1")]
        wait_for(lambda: len(_rounds(run)) >= 1, 180, "round 1")
        assert main(["certs", "--out", str(certs), "--add-node", "node-2"]) == 0  # while the server runs
        node_2 = client("node-2", "--max-wait", "30")
        sessions.append(node_2)
        wait_for(lambda: _rounds_of(run, "node-2"), 150, "node-2 to train in a round")
        joined = _rounds_of(run, "node-2")[0]
        listed = {row[0]: row for row in node_table(CertificateSet(certs), membership.noted_database(CertificateSet(certs)))}
        assert listed["node-2"][1] == "active" and listed["node-2"][3:] == (_id_of(run, "node-2"), "yes"), listed
        assert main(["nodes", "revoke", "--certs", str(certs), "node-2"]) == 0
        revoked_at, revoked_round = time.time(), len(_rounds(run))
        wait_for(lambda: len(_rounds(run)) > revoked_round, ROUND_TIMEOUT + 30, "the round running at the revocation")
        round_ended = time.time() - revoked_at
        wait_for(lambda: node_2.process.poll() is not None, 90, "node-2's client to stop")
        client_stopped = time.time() - revoked_at
        assert server.wait(timeout=ROUNDS * ROUND_TIMEOUT) == 0, server.output()[-3000:]
    finally:
        for session in sessions:
            session.kill()
    unregistered, refused = _unregistered_and_refused(run / "superlink.log")
    rounds, trained = _rounds(run), _rounds_of(run, "node-2")
    print(f"\nnode-2 joined in round {joined} and trained in rounds {trained}; revoked after round {revoked_round}: "
          f"unregistered {unregistered - revoked_at:.1f} s later, its next request refused {refused - unregistered:.1f} s "
          f"after that; the round then running ended after {round_ended:.1f} s; its client stopped after "
          f"{client_stopped:.1f} s (exit code {node_2.process.returncode})")
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert joined > 1  # its key came after round 1: no restart in between
    assert "node node-2 registered" in server.output() and "node node-2 unregistered" in server.output()
    assert unregistered - revoked_at < 30  # the server looks every 3 s, then one `flwr` command
    assert refused - unregistered < 12  # its next heartbeat (every 10 s) or pull is refused
    assert max(trained) <= revoked_round + 1  # at most the round running at the revocation, no later one
    assert all(len(r["clients"]) == 1 for r in rounds[revoked_round + 1:])  # node-1 alone again
