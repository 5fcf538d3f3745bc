"""``--set KEY=VALUE`` for the benchmark scripts: run settings by flag name, checked and typed
by the settings themselves (a bad one stops the script with its name)."""

from __future__ import annotations

from common.config import RunConfig, all_settings


def parse_overrides(pairs: list[str]) -> dict:
    """Snake-case setting names to typed values; SystemExit naming a malformed pair."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: write KEY=VALUE, e.g. --set rounds-per-task=5")
        out[key.replace("-", "_")] = value
    RunConfig.from_mapping(out)  # a bad setting stops here, with its name
    known = all_settings()
    return {k: known[k.replace("_", "-")].parse(v) for k, v in out.items()}
