"""Downloads are verified before they are kept; served here from a loopback HTTP server."""

import functools
import gzip
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from fedtide.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
pytestmark = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/datasets not present")


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving a copy of MNIST; yields (base URL, served folder)."""
    served = tmp_path / "served"
    shutil.copytree(SHARED / "mnist", served)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_fetches_and_verifies_all_files(mirror, tmp_path):
    url, _ = mirror
    dest = tmp_path / "data"
    assert main(["download", "mnist", "--to", str(dest), "--mirror", url]) == 0
    names = sorted(p.name for p in (dest / "mnist").iterdir())
    assert names == sorted(f"{s}.gz" for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def test_a_corrupted_mirror_file_is_refused_and_not_kept(mirror, tmp_path, capsys):
    url, served = mirror
    labels = served / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[50] ^= 1
    labels.chmod(0o644)
    labels.write_bytes(gzip.compress(bytes(content)))
    dest = tmp_path / "data"
    assert main(["download", "mnist", "--to", str(dest), "--mirror", url]) == 2
    err = capsys.readouterr().err
    assert "checksum" in err and "t10k-labels" in err
    assert not (dest / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((dest / "mnist").glob(".*part*"))


def test_an_unreachable_mirror_names_the_way_out(tmp_path, capsys):
    dest = tmp_path / "data"
    assert main(["download", "fashion-mnist", "--to", str(dest), "--mirror", "http://127.0.0.1:9/"]) == 2
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["/proc/fedtide-nowhere", "a-file"])
def test_a_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys, where):
    (tmp_path / "a-file").write_text("not a folder")
    to = where if where.startswith("/") else str(tmp_path / where)
    assert main(["download", "mnist", "--to", to, "--mirror", "http://127.0.0.1:9/"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtide: error: cannot write the download folder") and "--to" in err and "\n" not in err
