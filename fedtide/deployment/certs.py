"""``fedtide certs``: what a secured federation needs, made with the ``cryptography`` package.

- a certificate authority (``ca.crt``, ``ca.key``) that clients trust;
- a TLS certificate for the server (``server.crt``, ``server.key``) whose subject
  alternative names hold the server's name plus ``localhost`` and ``127.0.0.1``;
- one key pair per node (``node-<i>.key``, ``node-<i>.pub``, ECDSA P-384 in OpenSSH
  format, as Flower's node authentication expects): the server registers the public keys
  it finds in the folder, a client signs in with its private key.

``--add-node NAME`` adds one node's key pair to an existing folder and touches nothing else;
a running server registers it within seconds. The keys and certificates themselves are
made in ``fedtide.deployment.pki``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.errors import FedtideError
from fedtide.deployment.cert_files import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CertificateSet, node_key_names

__all__ = ["CA_CERT", "CA_KEY", "SERVER_CERT", "SERVER_KEY", "CertificateSet", "add_parser", "node_key_names", "run"]
DEFAULT_NODES = 2


def add_parser(commands: Any, methods: bool = True) -> None:
    parser = commands.add_parser(
        "certs",
        help="make the CA, the server's TLS certificate and node keys for a secured federation",
        description="Write ca.crt/ca.key, server.crt/server.key (valid for --server-name, localhost and "
        "127.0.0.1) and node-<i>.key/node-<i>.pub for each node. Give the server the folder without ca.key; give "
        "each client ca.crt and its own node-<i>.key only. With --add-node NAME: add one node's key pair "
        "to an existing folder (a running server registers it within seconds).",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    parser.add_argument("--server-name", metavar="HOST", help="host name or IP clients use to reach the server")
    parser.add_argument("--nodes", type=int, default=None, help=f"number of node key pairs (default: {DEFAULT_NODES})")
    parser.add_argument("--add-node", metavar="NAME",
                        help="add the key pair NAME.key/NAME.pub to the federation in --out, changing nothing else "
                        "(NAME: lowercase letters, digits, hyphens, e.g. node-3)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default: 365)")
    parser.add_argument("--force", action="store_true", help="replace files that already exist")


def run(args: argparse.Namespace) -> None:
    from fedtide.deployment import pki  # cryptography loads only for this command

    if args.add_node is not None:
        given = [flag for flag, value in (("--server-name", args.server_name), ("--nodes", args.nodes),
                                          ("--force", args.force or None)) if value is not None]
        if given:
            raise FedtideError(f"--add-node adds one key pair and changes nothing else: drop {', '.join(given)}")
        private, _ = pki.add_node(Path(args.out), args.add_node)
        print(f"wrote {private} and {private.with_suffix('.pub').name}: give the device ca.crt and {private.name}; "
              "a running server registers the node within seconds")
        return
    if args.server_name is None:
        raise FedtideError("--server-name HOST is required to make a federation (or add a node with --add-node NAME)")
    nodes = DEFAULT_NODES if args.nodes is None else args.nodes
    files = pki.make_certificates(Path(args.out), args.server_name, nodes, args.days, args.force)
    print(f"wrote {len(files)} files to {args.out}: server gets the folder (keep ca.key offline); client i gets ca.crt and node-i.key")
