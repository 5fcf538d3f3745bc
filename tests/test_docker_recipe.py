"""The Docker deployment: the install recipe both images run, and what the images and compose start.

No Docker daemon is needed: the recipe (docker/install.sh) runs here into a virtualenv, and the
Dockerfiles and compose.yaml are read and checked against the `fedtide certs|server|client`
contract; the certs service's script runs here, to see which keys each service can read.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from fedtide.cli import main

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"

# The command-line contract of the deployment commands: flags that must be given, flags that may
# be, and the flags among them that take no value. `server` also takes every `simulate` run flag.
CONTRACT = {
    "certs": ({"--out", "--server-name"}, {"--nodes", "--force"}, {"--force"}),
    "server": ({"--certs", "--database", "--out"}, {"--address", "--insecure"}, {"--insecure"}),
    "client": ({"--server", "--certs", "--node-key", "--data", "--state"}, {"--insecure"}, {"--insecure"}),
}
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def help_flags(command: str) -> set[str] | None:
    """The flags `fedtide COMMAND --help` lists, or None when the CLI has no such command."""
    shown, errors = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as ended, redirect_stdout(shown), redirect_stderr(errors):
        main([command, "--help"])
    if ended.value.code != 0:
        return None
    return set(re.findall(r"--[a-z][a-z0-9-]*", shown.getvalue())) - {"--help"}


@pytest.fixture(scope="module")
def run_flags() -> set[str]:
    """The flags of `fedtide simulate`, which `fedtide server` accepts as run settings."""
    flags = help_flags("simulate")
    assert flags and "--rounds-per-task" in flags
    return flags


def check_invocation(argv: list[str], run_flags: set[str]) -> str:
    """Assert that argv (the arguments after `fedtide`) keeps to the contract; return the command."""
    command, rest = argv[0], argv[1:]
    assert command in CONTRACT, f"fedtide {command}: not a deployment command"
    required, optional, switches = CONTRACT[command]
    allowed = required | optional | (run_flags if command == "server" else set())
    given = set()
    i = 0
    while i < len(rest):
        flag = rest[i]
        assert flag.startswith("--"), f"fedtide {command}: stray argument {flag!r} in {argv}"
        assert flag in allowed, f"fedtide {command}: {flag} is not in the contract"
        given.add(flag)
        has_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
        if flag in required | optional and flag not in switches:
            assert has_value, f"fedtide {command}: {flag} needs a value"
        if flag in switches:
            assert not has_value, f"fedtide {command}: {flag} takes no value"
        i += 2 if has_value else 1  # run flags: a value unless a switch such as --iid
    assert required <= given, f"fedtide {command}: missing {sorted(required - given)}"
    return command


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ---- Dockerfiles -------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for name, args in dockerfile_instructions(path):
        if name == "FROM":
            found.append([])
        if found:
            found[-1].append((name, args))
    return found


def build_stage_sources(path: Path) -> list[str]:
    """The context paths the build stage COPYs."""
    sources = []
    for name, args in stages(path)[0]:
        if name == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


def ignored(path: str, ignore_file: Path) -> bool:
    """Whether BuildKit leaves `path` out of the context (last matching pattern wins)."""
    verdict = False
    for pattern in ignore_file.read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "*/")) for p in prefixes):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("role", ["server", "client"])
def test_image_runs_fedtide_as_non_root_with_offline_flower(role, run_flags):
    dockerfile = DOCKER / f"Dockerfile.{role}"
    build, runtime = stages(dockerfile)
    assert build[0][1].split()[0] in ("${PYTHON_IMAGE}", "python:3.11-slim")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile.read_text()
    assert any(n == "RUN" and "docker/install.sh /opt/venv" in a and "FEDTIDE_REQUIRE_CPU_TORCH=1" in a
               for n, a in build), "the build stage must install with docker/install.sh, CPU torch required"
    assert any(n == "ARG" and a.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") for n, a in build)
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime

    users = [a for n, a in runtime if n == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"
    assert re.search(rf"useradd .*--uid {user}\b", dockerfile.read_text()), "USER must be the user the image creates"

    env = " ".join(a for n, a in runtime if n == "ENV")
    for key, value in FLOWER_ENV.items():
        assert f"{key}={value}" in env
    assert "FLWR_HOME" not in env  # fedtide server and client give Flower a home of their own

    assert json.loads(next(a for n, a in runtime if n == "ENTRYPOINT")) == ["fedtide"]
    cmd = json.loads(next(a for n, a in runtime if n == "CMD"))
    assert check_invocation(cmd, run_flags) == role
    for flag in ("--certs", "--data", "--state", "--out"):
        if flag in cmd:
            assert _option(cmd, flag).split("/")[1] in ("certs", "data", "state", "runs")
    if role == "server":
        assert any(n == "HEALTHCHECK" and "9092" in a for n, a in runtime)
        assert _option(cmd, "--address") == "0.0.0.0:9092"


@pytest.mark.parametrize("role", ["server", "client"])
def test_build_context_sends_only_what_the_build_copies(role):
    ignore_file = DOCKER / f"Dockerfile.{role}.dockerignore"
    for source in build_stage_sources(DOCKER / f"Dockerfile.{role}"):
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert not ignored(source, ignore_file), f"COPY {source} is excluded by {ignore_file.name}"
    for heavy in (".git", "runs", "bench", "tests", "benchmarks", "fedtide.egg-info", "client/__pycache__"):
        assert ignored(heavy, ignore_file), f"{heavy} would be sent to the build"


# ---- compose ----------------------------------------------------------------------------------

def shell_script(service: dict) -> str | None:
    """The script a service runs through `sh -c`, after compose's `$$` escape; None for a plain command."""
    if service.get("entrypoint") not in (["sh", "-c"], ["/bin/sh", "-c"]):
        return None
    command = service["command"]
    script = command[0] if isinstance(command, list) else command
    assert "$" not in script.replace("$$", ""), "a lone $ is interpolated by compose: write $$"
    return script.replace("$$", "$")


def fedtide_argv(service: dict) -> list[str]:
    """The arguments after `fedtide` a compose service runs (a line of its `sh -c` script, or the entrypoint's)."""
    script = shell_script(service)
    if script is not None:
        (line,) = [line for line in script.splitlines() if line.strip().startswith("fedtide ")]
        return shlex.split(line)[1:]
    command = service["command"]
    return list(command) if isinstance(command, list) else shlex.split(command)


def volume_mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Per target path in the container: (volume, subpath in it; "" for the whole volume)."""
    mounts = {}
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            mounts[target] = (source, "")
        else:
            assert volume["type"] == "volume", f"{volume}: only named volumes"
            mounts[volume["target"]] = (volume["source"], volume.get("volume", {}).get("subpath", ""))
    return mounts


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads compose.yaml")
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_starts_certs_then_server_then_two_clients(compose, run_flags):
    services = compose["services"]
    assert set(services) == {"certs", "server", "client-1", "client-2"}
    argv = {name: fedtide_argv(service) for name, service in services.items()}
    assert {name: check_invocation(a, run_flags) for name, a in argv.items()} == {
        "certs": "certs", "server": "server", "client-1": "client", "client-2": "client"}

    nodes = int(_option(argv["certs"], "--nodes"))
    assert nodes == 2 == int(_option(argv["server"], "--clients"))
    assert _option(argv["certs"], "--server-name") == "server"
    assert _option(argv["server"], "--certs") == "/certs"
    assert _option(argv["server"], "--address").endswith(":9092")
    assert any(str(p).split(":")[-2:] == ["9092", "9092"] for p in services["server"]["ports"])
    for i in (1, 2):
        client = argv[f"client-{i}"]
        assert _option(client, "--server") == "server:9092"
        assert _option(client, "--node-key") == f"/certs/node-{i}.key"
        assert _option(client, "--certs") == "/certs"

    def condition(service: str, on: str) -> str:
        return services[service]["depends_on"][on]["condition"]

    assert condition("server", "certs") == "service_completed_successfully"
    for client in ("client-1", "client-2"):
        assert condition(client, "certs") == "service_completed_successfully"
        assert condition(client, "server") == "service_healthy"

    mounts = {name: volume_mounts(service) for name, service in services.items()}
    assert set(compose["volumes"]) == {v for s in mounts.values() for v, _ in s.values()}, "undeclared volume"
    assert mounts["server"]["/runs"] != mounts["server"]["/state"]
    assert _option(argv["server"], "--database").startswith("/state/")
    for i in (1, 2):
        own = mounts[f"client-{i}"]
        assert own["/data"] == (f"client-{i}-data", "") and own["/state"] == (f"client-{i}-state", "")
        assert _option(argv[f"client-{i}"], "--data") == "/data"
        assert _option(argv[f"client-{i}"], "--state") == "/state"
    for name, service in services.items():
        role = "client" if name.startswith("client") else "server"
        assert service["build"]["dockerfile"] == f"docker/Dockerfile.{role}"
        assert (DOCKER / service["build"]["context"] / "pyproject.toml").exists()


def run_certs_service(compose: dict, root: Path) -> Path:
    """Run the certs service's script here, its /certs and /tmp under ``root``; return the
    folder that stands for the certs volume."""
    service = compose["services"]["certs"]
    (target,) = [t for t, (v, _) in volume_mounts(service).items() if v == "certs"]
    script = shell_script(service)
    assert script is not None and target == "/certs"
    script = re.sub(r"(?<![\w.-])/(certs|tmp)\b", lambda m: f"{root}/{m.group(1)}", script)  # one pass
    (root / "certs").mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "certs"


def visible_files(mounts: dict[str, tuple[str, str]], certs_volume: Path) -> dict[str, bytes]:
    """Every file a container sees in the certs volume: its path there and its content."""
    seen = {}
    for target, (volume, subpath) in mounts.items():
        if volume != "certs":
            continue
        top = certs_volume / subpath
        assert top.is_dir(), f"{target}: the certs service makes no folder {subpath!r}"
        seen |= {f"{target}/{f.relative_to(top)}": f.read_bytes() for f in top.rglob("*") if f.is_file()}
    return seen


def test_compose_gives_each_client_only_ca_crt_and_its_own_node_key(compose, tmp_path):
    """SECURITY.md: a device gets ca.crt and its own key; the server the folder without ca.key."""
    from fedtide.deployment.cert_files import CertificateSet

    volume = run_certs_service(compose, tmp_path)
    services = compose["services"]
    made = {f.name: f.read_bytes() for f in volume.rglob("*") if f.is_file()}
    assert "ca.key" not in made, "ca.key is kept in the certs volume"
    assert not (tmp_path / "tmp" / "issue").exists(), "the certs service leaves its working copy behind"
    secrets = {name: made[name] for name in ("server.key", "node-1.key", "node-2.key")}

    for i in (1, 2):
        seen = visible_files(volume_mounts(services[f"client-{i}"]), volume)
        assert set(seen) == {"/certs/ca.crt", f"/certs/node-{i}.key"}
        assert seen[f"/certs/node-{i}.key"] == secrets[f"node-{i}.key"]
        for name, content in secrets.items():  # not under another name either
            assert name == f"node-{i}.key" or content not in seen.values(), f"client-{i} sees {name}"
        assert _certs_read_only(services[f"client-{i}"]) == [True]

    seen = visible_files(volume_mounts(services["server"]), volume)
    assert set(seen) == {"/certs/ca.crt", "/certs/server.crt", "/certs/server.key", "/certs/node-1.pub", "/certs/node-2.pub"}
    server_certs = CertificateSet(volume / volume_mounts(services["server"])["/certs"][1])
    server_certs.require_server_files()  # what `fedtide server --certs /certs` reads is all there
    assert [p.name for p in server_certs.node_public_keys()] == ["node-1.pub", "node-2.pub"]
    assert _certs_read_only(services["server"]) == [True]

    before = {f: f.read_bytes() for f in volume.rglob("*") if f.is_file()}
    run_certs_service(compose, tmp_path)  # a later `up` keeps the set
    assert {f: f.read_bytes() for f in volume.rglob("*") if f.is_file()} == before


def _certs_read_only(service: dict) -> list[bool]:
    """Per mount of the certs volume: whether it is read-only."""
    return [
        v.endswith(":ro") if isinstance(v, str) else v.get("read_only", False)
        for v in service["volumes"] if (v.split(":")[0] if isinstance(v, str) else v["source"]) == "certs"
    ]


@pytest.mark.parametrize("command", sorted(CONTRACT))
def test_contract_flags_exist_in_the_cli(command):
    """Once the CLI has the deployment commands, every contract flag must be one of theirs."""
    flags = help_flags(command)
    if flags is None:
        pytest.skip(f"`fedtide {command}` is not in the CLI yet")
    required, optional, _ = CONTRACT[command]
    assert required | optional <= flags, f"fedtide {command} lacks {sorted((required | optional) - flags)}"


# ---- the install recipe -----------------------------------------------------------------------

@pytest.mark.slow
def test_install_recipe_puts_a_working_fedtide_into_a_venv(tmp_path):
    """docker/install.sh on exactly what the image build copies, into a venv reusing this torch."""
    src = tmp_path / "src"
    for source in build_stage_sources(DOCKER / "Dockerfile.server"):
        copy = shutil.copytree if (REPO / source).is_dir() else shutil.copy2
        (src / source).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / source, src / source, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                              if (REPO / source).is_dir() else {}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    # the new venv sees this interpreter's packages (torch, flwr, pip, setuptools): `--system-site-packages`
    # would show it the base interpreter's instead, which lack them when the tests run in a venv
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "outer-packages.pth").write_text("\n".join(_site_dirs()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_SPEC", "TORCH_INDEX_URL")}
    env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")  # nothing is downloaded: all it needs is here
    for attempt in ("install", "re-run"):  # the recipe must be safe to run twice
        done = subprocess.run(["sh", str(src / "docker" / "install.sh"), str(venv)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, f"{attempt}: {done.stdout}\n{done.stderr}"
        assert "install.sh: ok: torch" in done.stdout
    assert "reusing the virtualenv" in done.stdout
    assert not list(venv.glob("lib/python3*/site-packages/torch")), "torch was downloaded again, not reused"

    shown = subprocess.run([str(venv / "bin" / "fedtide"), "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "simulate" in shown.stdout, shown.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import client.app, server.app, common.config; print(client.app.__file__); "
                            "print(server.app.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    for module_file in where.stdout.split():
        assert Path(module_file).resolve().is_relative_to(venv.resolve()), f"imported {module_file}, not the venv's copy"


def _site_dirs() -> list[str]:
    """The folders this interpreter imports installed packages from."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))
