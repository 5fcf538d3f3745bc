"""The files of a certificate folder and where each is (``fedtide certs`` writes them,
``fedtide.deployment.pki`` makes their content, the server and clients read them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import FedtideError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODE_KEY_PATTERN = "node-*.pub"


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
