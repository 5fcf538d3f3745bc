"""``fedtide certs``: what a secured federation needs, made with the ``cryptography`` package.

- a certificate authority (``ca.crt``, ``ca.key``) that clients trust;
- a TLS certificate for the server (``server.crt``, ``server.key``) whose subject
  alternative names hold the server's name plus ``localhost`` and ``127.0.0.1``;
- one key pair per node (``node-<i>.key``, ``node-<i>.pub``, ECDSA P-384 in OpenSSH
  format, as Flower's node authentication expects): the server registers the public keys
  it finds in the folder, a client signs in with its private key.

Private keys are written with mode 0600, atomically; nothing is overwritten without ``force``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FedtideError
from common.files import write_bytes_atomic

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODE_KEY_PATTERN = "node-*.pub"
PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644


@dataclass(frozen=True)
class CertificateSet:
    """Where each file of a certificate folder is."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def node_public_keys(self) -> list[Path]:
        """Every node public key in the folder, in node order (node-1, node-2, ... node-10)."""
        keys = list(self.folder.glob(NODE_KEY_PATTERN))
        return sorted(keys, key=lambda p: (len(p.stem), p.stem))

    def require_server_files(self) -> None:
        missing = [p.name for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise FedtideError(
                f"--certs {self.folder} lacks {', '.join(missing)}: make the folder with "
                "`fedtide certs --out DIR --server-name HOST`, or run with --insecure"
            )


def node_key_names(index: int) -> tuple[str, str]:
    return f"node-{index}.key", f"node-{index}.pub"


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
            "(every client then needs the new ca.crt and node keys)"
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
        key = ec.generate_private_key(ec.SECP384R1())
        private_name, public_name = node_key_names(index)
        files[private_name] = (
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            PRIVATE_MODE,
        )
        files[public_name] = (
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" fedtide-node-{index}\n".encode(),
            PUBLIC_MODE,
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, (data, mode) in files.items():
            write_bytes_atomic(folder / name, data, mode=mode)
    except OSError as err:
        raise FedtideError(f"cannot write certificates to {folder} ({err.strerror or err}): choose a writable --out") from None
    return [folder / name for name in files]


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


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "certs",
        help="make the CA, the server's TLS certificate and node keys for a secured federation",
        description="Write ca.crt/ca.key, server.crt/server.key (valid for --server-name, localhost and "
        "127.0.0.1) and node-<i>.key/node-<i>.pub for each node. Give the server the whole folder; give "
        "each client ca.crt and its own node-<i>.key only.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    parser.add_argument("--server-name", required=True, metavar="HOST", help="host name or IP clients use to reach the server")
    parser.add_argument("--nodes", type=int, default=2, help="number of node key pairs (default: 2)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default: 365)")
    parser.add_argument("--force", action="store_true", help="replace files that already exist")


def run(args: argparse.Namespace) -> None:
    files = make_certificates(Path(args.out), args.server_name, args.nodes, args.days, args.force)
    print(f"wrote {len(files)} files to {args.out}: server gets the folder; client i gets ca.crt and node-i.key")
