"""``HOST:PORT`` as a user writes it for a listening endpoint (metrics, status page, predictions)."""

from __future__ import annotations

from common.errors import FedtideError


def parse_address(address: str, flag: str, example: str, port_alone: bool = False) -> tuple[str, int]:
    """(host, port) of ``address``; with ``port_alone``, ``PORT`` alone means loopback. Port 0
    asks for any free port. FedtideError naming ``flag`` when it is not that."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or ("127.0.0.1" if port_alone else "")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        alone = " or PORT" if port_alone else ""
        raise FedtideError(f"{flag} {address[:60]}: give HOST:PORT{alone}, e.g. {example} (port 0: any free one)")
    return host, int(port)
