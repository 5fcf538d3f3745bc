"""The files of a certificate folder and where each is (``fedtide certs`` writes them,
``fedtide.deployment.pki`` makes their content, the server and clients read them).

A node is a name (``node-3``, ``edge-lyon``: lowercase letters, digits and inner hyphens,
at most 32 characters) and a key pair ``NAME.key``/``NAME.pub``. The server registers every
``NAME.pub`` of the folder; ``fedtide nodes revoke`` moves one to ``revoked/``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedtideError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
REVOKED = "revoked"  # sub-folder: the public keys of revoked nodes, kept as the record
NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
RESERVED_NAMES = frozenset({"ca", "server", REVOKED})  # their files are the CA's, the server's, the record
MAX_PUBLIC_KEY_BYTES = 4096  # an OpenSSH P-384 public key line is about 250 bytes


def check_node_name(name: str) -> str:
    """``name`` when it is a valid node name, else a FedtideError saying what a name may be."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name) or name in RESERVED_NAMES:
        shown = repr(name)[:40]
        raise FedtideError(
            f"node name {shown} is not allowed: use 1-32 lowercase letters, digits and inner hyphens "
            f"(e.g. node-3), other than {', '.join(sorted(RESERVED_NAMES))}"
        )
    return name


def is_node_name(name: object) -> bool:
    return isinstance(name, str) and bool(NODE_NAME.fullmatch(name)) and name not in RESERVED_NAMES


def node_order(name: str) -> tuple:
    """Sort key putting node-2 before node-10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


@dataclass(frozen=True)
class NodeKey:
    """One node's public key file: its name, path, Flower's bytes for it and its fingerprint."""

    name: str
    path: Path
    openssh: bytes  # the file's first line, as written by `fedtide certs`

    @property
    def fingerprint(self) -> str:
        """OpenSSH's SHA256 fingerprint (what `ssh-keygen -lf NAME.pub` prints)."""
        blob = base64.b64decode(self.openssh.split()[1])
        return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    def flower_bytes(self) -> bytes:
        """The key as Flower's SuperLink stores it (PEM SubjectPublicKeyInfo)."""
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_ssh_public_key(self.openssh)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """The content of ``path`` when it is a regular file (a link is never followed) of at most
    ``limit`` bytes, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


def read_node_key(path: Path) -> NodeKey | None:
    """The node key at ``path``, or None when it is not one: a bad name, not a regular file
    (links are never followed), too large, or not an OpenSSH ECDSA key line."""
    name = path.name[: -len(".pub")] if path.name.endswith(".pub") else ""
    if not is_node_name(name):
        return None
    data = read_regular_file(path, MAX_PUBLIC_KEY_BYTES)
    if data is None:
        return None
    lines = data.splitlines()
    if not lines:
        return None
    fields = lines[0].split()
    if len(fields) < 2 or not fields[0].startswith(b"ecdsa-sha2-nistp"):
        return None
    key = NodeKey(name, path, b" ".join(fields[:2]))
    try:
        key.flower_bytes()  # a key Flower could not load is no node's
    except (ValueError, TypeError):
        return None
    return key


def node_keys_in(folder: Path) -> list[NodeKey]:
    """The valid node public keys directly in ``folder``, in node order (none if it is missing)."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.endswith(".pub")]
    except OSError:
        return []
    keys = [key for name in names if (key := read_node_key(Path(folder) / name)) is not None]
    return sorted(keys, key=lambda k: node_order(k.name))


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

    @property
    def revoked_folder(self) -> Path:
        return self.folder / REVOKED

    def node_public_keys(self) -> list[Path]:
        """Every active node public key in the folder, in node order (node-1, node-2, ... node-10)."""
        return [key.path for key in self.active_nodes()]

    def active_nodes(self) -> list[NodeKey]:
        return node_keys_in(self.folder)

    def revoked_nodes(self) -> list[NodeKey]:
        return node_keys_in(self.revoked_folder)

    def require_server_files(self) -> None:
        missing = [p.name for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise FedtideError(
                f"--certs {self.folder} lacks {', '.join(missing)}: make the folder with "
                "`fedtide certs --out DIR --server-name HOST`, or run with --insecure"
            )


def node_key_names(index: int) -> tuple[str, str]:
    return node_file_names(f"node-{index}")


def node_file_names(name: str) -> tuple[str, str]:
    """The private and public key file names of node ``name``."""
    return f"{name}.key", f"{name}.pub"
