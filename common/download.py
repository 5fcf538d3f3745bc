"""Download MNIST / Fashion-MNIST on request, verifying every file before it is kept.

A file is fetched to a temporary name, checked against the sha256 of its original
decompressed content, and only then renamed into place; a failed or corrupted download
leaves nothing behind and the next mirror is tried.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from common.errors import FedtideError
from common.files import ensure_writable_folder
from common.idx import read_idx
from common.image_datasets import CHECKSUMS, FILES

MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
CHUNK = 1 << 16


def download_dataset(
    name: str,
    dest: Path,
    mirrors: tuple[str, ...] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Fetch the four IDX files of ``name`` into ``dest/name``; return that folder.

    Files already there and valid are kept. ``progress(file, done_bytes, total_bytes)``
    is called while downloading. FedtideError when ``dest`` cannot be written or a file
    cannot be had from any mirror.
    """
    if name not in CHECKSUMS:
        raise FedtideError(f"unknown dataset '{name}' to download: use {', '.join(CHECKSUMS)}")
    folder = ensure_writable_folder(Path(dest) / name, "the download folder", "--to")
    for stem in FILES:
        target = folder / f"{stem}.gz"
        if target.is_file():
            try:
                read_idx(target, CHECKSUMS[name][stem], cache=False)
                continue
            except FedtideError:
                target.unlink()  # a damaged copy is replaced, never trusted
        failures = []
        for mirror in mirrors or MIRRORS[name]:
            url = mirror.rstrip("/") + f"/{stem}.gz"
            try:
                _fetch_verified(url, target, CHECKSUMS[name][stem], progress, timeout)
                break
            except (FedtideError, OSError, urllib.error.URLError) as err:
                failures.append(f"{url}: {err}")
        else:
            raise FedtideError(
                f"could not download {stem}.gz for {name} ({'; '.join(failures)}): check the network, "
                "or copy the files by hand into a folder and pass it with --data-dir"
            )
    return folder


def _fetch_verified(url: str, target: Path, sha256: str, progress, timeout: float) -> None:
    # the ".gz" suffix lets the IDX reader decompress the partial file to verify it
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part.gz")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(target.name, done, total)
            out.flush()
            os.fsync(out.fileno())
        read_idx(Path(tmp), sha256, cache=False)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
