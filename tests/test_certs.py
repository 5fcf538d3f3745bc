"""`fedtide certs` makes what a secured federation needs, and `fedtide server` / `fedtide client`
refuse bad setups with one line before any process starts."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from fedtide.deployment.certs import CertificateSet
from fedtide.cli import main


def _certs(tmp_path, *extra):
    folder = tmp_path / "certs"
    assert main(["certs", "--out", str(folder), "--server-name", "fl.example.org", *extra]) == 0
    return folder


def test_certs_make_a_ca_a_server_certificate_for_the_name_and_loopback_and_node_keys(tmp_path):
    folder = _certs(tmp_path, "--nodes", "3")
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    keys = CertificateSet(folder).node_public_keys()
    assert [k.name for k in keys] == ["node-1.pub", "node-2.pub", "node-3.pub"]
    for index, public_path in enumerate(keys, start=1):
        public = load_ssh_public_key(public_path.read_bytes())
        private = load_ssh_private_key((folder / f"node-{index}.key").read_bytes(), password=None)
        assert isinstance(public, ec.EllipticCurvePublicKey) and uses_nist_ec_curve(public)  # what Flower accepts
        assert private.public_key().public_numbers() == public.public_numbers()


def test_private_keys_are_readable_by_their_owner_only(tmp_path):
    folder = _certs(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert {n: m for n, m in modes.items() if n.endswith(".key")} == {
        "ca.key": 0o600, "server.key": 0o600, "node-1.key": 0o600, "node-2.key": 0o600,
    }
    assert modes["ca.crt"] == modes["node-1.pub"] == 0o644


def test_certs_are_not_overwritten_without_force(tmp_path, capsys):
    folder = _certs(tmp_path)
    before = (folder / "ca.key").read_bytes()
    code = main(["certs", "--out", str(folder), "--server-name", "x"])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (folder / "ca.key").read_bytes() == before
    assert main(["certs", "--out", str(folder), "--server-name", "x", "--force"]) == 0
    assert (folder / "ca.key").read_bytes() != before


def test_node_keys_sort_in_node_order_past_nine(tmp_path):
    folder = _certs(tmp_path, "--nodes", "11")
    assert [k.stem for k in CertificateSet(folder).node_public_keys()][8:] == ["node-9", "node-10", "node-11"]


@pytest.mark.parametrize(
    "flags, words",
    [
        ([], "--certs DIR is required"),
        (["--certs", "{missing}"], "lacks ca.crt"),
        (["--insecure"], "--clients N"),
        (["--insecure", "--clients", "2", "--fraction-evaluate", "0.5"], "--fraction-evaluate must stay 0"),
        (["--insecure", "--clients", "2", "--address", "localhost"], "is not HOST:PORT"),
        (["--insecure", "--clients", "2", "--training", "joint"], "use `fedtide simulate`"),
    ],
)
def test_server_refuses_bad_setups_in_one_line(tmp_path, capsys, flags, words):
    flags = [f.format(missing=tmp_path / "nothing") for f in flags]
    code = main(["server", "--database", str(tmp_path / "db"), "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert any(words in line for line in err) and err[-1].startswith("fedtide: error:")


def test_server_needs_node_keys_to_authenticate_anyone(tmp_path, capsys):
    folder = _certs(tmp_path, "--nodes", "0")
    code = main(["server", "--certs", str(folder), "--database", str(tmp_path / "db"), "--out", str(tmp_path / "run")])
    assert code == 2 and "holds no node-*.pub" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, words",
    [("ca.crt", "is not an unencrypted OpenSSH EC private key"), ("missing.key", "cannot read it")],
)
def test_client_refuses_a_bad_node_key_in_one_line(tmp_path, capsys, key, words):
    folder = _certs(tmp_path)
    code = main(["client", "--server", "127.0.0.1:9", "--certs", str(folder), "--node-key", str(folder / key),
                 "--data", str(tmp_path / "data"), "--state", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and words in err


def test_client_needs_the_ca_certificate(tmp_path, capsys):
    folder = _certs(tmp_path)
    (folder / "ca.crt").unlink()
    code = main(["client", "--server", "127.0.0.1:9", "--certs", str(folder), "--node-key", str(folder / "node-1.key"),
                 "--data", str(tmp_path / "data"), "--state", str(tmp_path / "state")])
    assert code == 2 and "has no ca.crt" in capsys.readouterr().err


def test_server_counts_node_keys_as_clients_before_checking_the_settings(tmp_path, capsys):
    folder = _certs(tmp_path, "--nodes", "6")
    code = main(["server", "--certs", str(folder), "--database", str(tmp_path / "db"), "--out", str(tmp_path / "run"),
                 "--min-clients", "7"])
    assert code == 2 and "between 0 (all) and --clients 6" in capsys.readouterr().err


def test_server_refuses_an_address_another_process_holds(tmp_path, capsys):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["server", "--insecure", "--clients", "1", "--database", str(tmp_path / "db"),
                     "--out", str(tmp_path / "run"), "--address", f"127.0.0.1:{port}"])
    assert code == 2 and "is not free" in capsys.readouterr().err


def test_a_smaller_new_set_of_certs_leaves_no_old_node_key_behind(tmp_path):
    folder = _certs(tmp_path, "--nodes", "3")
    assert main(["certs", "--out", str(folder), "--server-name", "x", "--nodes", "1", "--force"]) == 0
    assert sorted(p.name for p in folder.glob("node-*")) == ["node-1.key", "node-1.pub"]
