"""Keys and certificates for a federation, made with the ``cryptography`` package (the file
layout is ``fedtide.deployment.certs``'). Private keys are written with mode 0600, atomically;
nothing is overwritten without ``force``."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FedtideError
from common.files import write_bytes_atomic
from fedtide.deployment.cert_files import (
    CA_CERT, CA_KEY, REVOKED, SERVER_CERT, SERVER_KEY, check_node_name, is_node_name, node_file_names, node_key_names,
)

PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644


def make_certificates(folder: Path, server_name: str, nodes: int, days: int = 365, force: bool = False) -> list[Path]:
    """Write the CA, the server certificate and ``nodes`` node key pairs; return the files written."""
    if nodes < 0:
        raise FedtideError(f"--nodes must be >= 0 (got {nodes})")
    if days < 1:
        raise FedtideError(f"--days must be >= 1 (got {days})")
    if not server_name.strip():
        raise FedtideError("--server-name is empty: give the host name or IP clients use to reach the server")
    folder = Path(folder)
    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY] + [n for i in range(1, nodes + 1) for n in node_key_names(i)]
    existing = [n for n in names if (folder / n).exists()]
    if existing and not force:
        raise FedtideError(
            f"{folder} already holds {', '.join(existing)}: pass --force to replace them "
            "(every client then needs the new ca.crt and node keys), or add one node with --add-node NAME"
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtide federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]), ca_name, server_key.public_key(), now, days
        )
        .add_extension(x509.SubjectAlternativeName(_alternative_names(server_name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = {
        CA_CERT: (ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
        CA_KEY: (_pem_private(ca_key), PRIVATE_MODE),
        SERVER_CERT: (server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
        SERVER_KEY: (_pem_private(server_key), PRIVATE_MODE),
    }
    for index in range(1, nodes + 1):
        files.update(_node_key_files(f"node-{index}"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, (data, mode) in files.items():
            write_bytes_atomic(folder / name, data, mode=mode)
        for stale in [*folder.glob("*.key"), *folder.glob("*.pub")]:
            if is_node_name(stale.stem) and stale.name not in files:  # an earlier set's node: the server
                stale.unlink()  # would still register it
    except OSError as err:
        raise FedtideError(f"cannot write certificates to {folder} ({err.strerror or err}): choose a writable --out") from None
    return [folder / name for name in files]


def add_node(folder: Path, name: str) -> list[Path]:
    """Write a key pair for a new node ``name`` into the federation's ``folder``; return the
    files written. Nothing else in the folder changes (its CA, server certificate and other
    keys stay as they are). The public key is written last: a running server that sees it
    registers a node whose private key is complete."""
    folder = Path(folder)
    check_node_name(name)
    if not (folder / CA_CERT).is_file() or not (folder / SERVER_CERT).is_file():
        raise FedtideError(
            f"{folder} holds no federation ({CA_CERT} and {SERVER_CERT}): make one with "
            "`fedtide certs --out DIR --server-name HOST` first"
        )
    taken = [n for n in (*node_file_names(name), f"{REVOKED}/{name}.pub") if os.path.lexists(folder / n)]
    if taken:
        raise FedtideError(
            f"node name {name} is taken in {folder} ({', '.join(taken)}): choose another name "
            "(a revoked node's name stays taken)"
        )
    files = _node_key_files(name)
    try:
        for file_name, (data, mode) in files.items():
            write_bytes_atomic(folder / file_name, data, mode=mode)
    except OSError as err:
        raise FedtideError(f"cannot write the node key to {folder} ({err.strerror or err}): is the folder writable?") from None
    return [folder / file_name for file_name in files]


def _node_key_files(name: str) -> dict[str, tuple[bytes, int]]:
    """A new ECDSA P-384 key pair in OpenSSH format (as Flower's node authentication expects):
    private key first, public key second."""
    key = ec.generate_private_key(ec.SECP384R1())
    private_name, public_name = node_file_names(name)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {private_name: (private, PRIVATE_MODE), public_name: (public + f" fedtide-{name}\n".encode(), PUBLIC_MODE)}


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime, days: int) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _alternative_names(server_name: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys([server_name, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
