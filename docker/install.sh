#!/bin/sh
# Install fedtide, with a CPU-only torch, into a virtualenv, then smoke-check it.
# The one recipe: both images run it, and so does the test (tests/test_docker_recipe.py).
#
#   docker/install.sh [VENV]        VENV: the target virtualenv (default $FEDTIDE_VENV, else /opt/venv);
#                                   created when missing, reused when present (re-running is safe).
#
# Settings, all by environment variable:
#   FEDTIDE_SRC       the source tree to install (default: the folder above this script)
#   PYTHON            interpreter that creates a missing VENV (default: python3)
#   TORCH_SPEC        torch requirement (default: torch==2.13.0). A torch the venv already sees
#                     that satisfies it is kept, so a venv made with --system-site-packages
#                     reuses the torch installed beside it.
#   TORCH_INDEX_URL   index torch is taken from (default: empty = pip's usual index). Images set
#                     https://download.pytorch.org/whl/cpu: on amd64 PyPI's torch pulls CUDA; on
#                     arm64 PyPI's torch is CPU-only already, so either works there.
#   FEDTIDE_REQUIRE_CPU_TORCH=1   fail if the torch in VENV is a CUDA build (images set it)
#   FEDTIDE_SLIM=1    drop what no run needs from VENV's own site-packages (torch's C++ headers);
#                     never touches packages outside VENV
set -eu

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-${FEDTIDE_VENV:-/opt/venv}}
src=${FEDTIDE_SRC:-$here/..}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
torch_index=${TORCH_INDEX_URL:-}

[ -f "$src/pyproject.toml" ] || die "no pyproject.toml in $src: set FEDTIDE_SRC to the fedtide source tree"
src=$(cd "$src" && pwd)

export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

if [ -x "$venv/bin/python" ]; then
    say "reusing the virtualenv $venv"
else
    command -v "$python" >/dev/null 2>&1 || die "no interpreter '$python' to create $venv: set PYTHON"
    say "creating the virtualenv $venv"
    "$python" -m venv "$venv" || die "could not create $venv (is the venv module installed?)"
fi
py=$venv/bin/python
pip() { "$py" -m pip --quiet "$@"; }

# torch first, alone, so that the fedtide step finds it satisfied and never swaps in PyPI's build.
if [ -n "$torch_index" ]; then
    say "torch: $torch_spec from $torch_index"
    pip install --index-url "$torch_index" "$torch_spec" || die "could not install $torch_spec from $torch_index"
else
    say "torch: $torch_spec (a satisfying torch already visible to $venv is kept)"
    pip install "$torch_spec" || die "could not install $torch_spec"
fi
say "fedtide from $src (not editable)"
pip install "$src" || die "could not install fedtide from $src"

if [ "${FEDTIDE_SLIM:-0}" = 1 ]; then
    for site in "$venv"/lib/python3*/site-packages; do
        rm -rf "$site/torch/include" "$site/torch/share/cmake"
    done
    say "slimmed $venv (torch C++ headers removed)"
fi

# Smoke check, from a folder outside the source tree, so the installed package is what imports.
cd /
"$venv/bin/fedtide" --help >/dev/null || die "'fedtide --help' failed in $venv"
found=$("$py" -c "import client.app, server.app, common.config, flwr, torch
print(torch.__version__, flwr.__version__, torch.version.cuda or '')") || die "the installed fedtide does not import in $venv"
# shellcheck disable=SC2086  # split on purpose
set -- $found  # torch version, flwr version, CUDA version (none for a CPU build)
if [ -n "${3:-}" ]; then
    if [ "${FEDTIDE_REQUIRE_CPU_TORCH:-0}" = 1 ]; then
        die "torch in $venv is a CUDA $3 build; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    fi
    say "note: torch in $venv is a CUDA $3 build (fine here; the images require a CPU build)"
fi
if [ -x "$venv/bin/flower-supernode" ]; then
    "$venv/bin/flower-supernode" --version >/dev/null 2>&1 || die "'flower-supernode --version' failed in $venv"
else  # flwr came from the site-packages the venv reuses: its script lives elsewhere, run its entry point
    "$py" -c "import sys; from importlib.metadata import entry_points
(ep,) = entry_points(group='console_scripts', name='flower-supernode')
sys.argv = ['flower-supernode', '--version']
sys.exit(ep.load()())" >/dev/null 2>&1 || die "'flower-supernode --version' failed in $venv"
fi
say "ok: torch $1, flwr $2 in $venv"
