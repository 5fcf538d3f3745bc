"""`fedtide simulate --engine flower` on a Ray cluster the user already runs: a real head node
on 127.0.0.1 (its own port and temp folder), joined, used, and stopped by its PID; the Ray
flags' bad values refused in one line."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.errors import FedtideError
from fedtide.runtimes.flower_engine import RayCluster
from loopback import OFFLINE, ROOT, free_port, session_pids

RUN = ["--num-tasks", "2", "--rounds-per-task", "1", "--clients", "3", "--local-epochs", "1", "--seed", "4", "--quiet"]


def _fedtide(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtide.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _wait_for_port(port: int, head: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited before it listened"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the Ray head did not listen on port {port} within {seconds} s")


@pytest.fixture
def ray_head():
    """A Ray head node with 2 CPUs on 127.0.0.1; yields its address. It runs in a session of
    its own and is stopped by signalling that session, never with a global `ray stop`."""
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        pytest.skip("the ray command is not installed next to this Python")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--num-gpus", "0", "--temp-dir", str(temp), "--include-dashboard", "false", "--disable-usage-stats", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for_port(port, head)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_session(head)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_session(head: subprocess.Popen) -> None:
    """SIGTERM to every process of the head's session (`ray start --block` then stops what it
    started), SIGKILL to any still there after 20 s."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        for pid in session_pids(head.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while session_pids(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(head.pid):
            break
    head.wait(timeout=10)


@pytest.mark.slow
def test_simulate_joins_a_running_ray_cluster_and_matches_the_in_process_run(tmp_path, ray_head):
    own_ray_tmp = tmp_path / "own-ray"
    own_ray_tmp.mkdir()
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(own_ray_tmp),
           "FLWR_HOME": str(tmp_path / "flwr"), "RAY_USAGE_STATS_ENABLED": "0"}
    joined = _fedtide(["simulate", "--engine", "flower", "--ray-address", ray_head, "--client-cpus", "0.5",
                       "--out", str(tmp_path / "cluster"), *RUN], env)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert not any(own_ray_tmp.iterdir()), "a Ray instance was started here instead of joining the cluster"
    local = _fedtide(["simulate", "--out", str(tmp_path / "local"), *RUN], env)
    assert local.returncode == 0, local.stderr[-3000:]
    on_cluster = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    here = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert on_cluster["rounds"] == here["rounds"] == 2
    assert on_cluster["rejected_replies"] == 0
    assert abs(on_cluster["acc"] - here["acc"]) <= 0.01
    # a client needing more than any node has is refused before Ray would wait for it forever
    too_big = _fedtide(["simulate", "--engine", "flower", "--ray-address", ray_head, "--client-cpus", "3",
                        "--out", str(tmp_path / "too-big"), *RUN], env)
    assert too_big.returncode == 2
    assert "no node of the Ray cluster can hold a client" in too_big.stderr and "lower them" in too_big.stderr
    assert "Traceback" not in too_big.stderr


@pytest.mark.slow
def test_an_address_where_no_cluster_runs_is_a_clear_error(tmp_path):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp_path / "ray"),
           "FLWR_HOME": str(tmp_path / "flwr"), "RAY_USAGE_STATS_ENABLED": "0"}
    done = _fedtide(["simulate", "--engine", "flower", "--ray-address", f"127.0.0.1:{free_port()}",
                     "--out", str(tmp_path / "run"), *RUN], env)
    assert done.returncode == 2
    assert "could not start or join the Ray cluster at 127.0.0.1:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("address", ["", "no-port", "host:0", "host:70000", "a b:1", "x" * 300 + ":1", "http://h:1"])
def test_a_malformed_ray_address_is_refused(address):
    with pytest.raises(FedtideError, match="is not a Ray cluster address"):
        RayCluster(address)


@pytest.mark.parametrize("cpus, gpus", [(0, 0), (0.01, 0), (1, 0.001), (-1, 0), (float("nan"), 0), (float("inf"), 0), (1, -0.5),
                                        (1, float("nan")), (2000, 0), (1, 100), (True, 0)])
def test_client_resources_out_of_range_are_refused(cpus, gpus):
    with pytest.raises(FedtideError, match="--client-"):
        RayCluster(None, cpus, gpus)


def test_good_ray_settings_become_rays_arguments():
    joined = RayCluster("ray://10.0.0.5:10001", 0.5, 0.25)
    assert joined.init_args()["address"] == "ray://10.0.0.5:10001" and "num_cpus" not in joined.init_args()
    assert joined.client_resources() == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert RayCluster("[::1]:6379").address == "[::1]:6379" and RayCluster("auto").address == "auto"
    assert RayCluster().init_args()["num_cpus"] >= 1  # Ray here: this machine's cores


def test_ray_flags_are_refused_without_the_flower_engine(tmp_path):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    done = _fedtide(["simulate", "--client-cpus", "2", "--out", str(tmp_path / "run"), *RUN], env, timeout=60)
    assert done.returncode == 2
    assert "--client-cpus only apply to Flower's engine" in done.stderr
    assert not (tmp_path / "run").exists()
