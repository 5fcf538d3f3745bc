"""The run settings as command-line flags: one flag per setting, shared by
``fedtide simulate`` and ``fedtide server`` (and presets, and $FEDTIDE_DATA_DIR)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from common.config import RunConfig, all_settings, section_settings
from common.errors import FedtideError
from common.method_registry import method_settings, readers, selectable_names
from fedtide.presets import preset_settings

DATA_DIR_ENV = "FEDTIDE_DATA_DIR"

def add_config_flags(parser: argparse.ArgumentParser, methods: bool = True) -> None:
    """One flag per setting: the sections' (``common.sections``) and, with ``methods``, the
    methods' (``common.method_registry``; listing them imports the methods, and so torch: a
    command that will not parse these flags leaves them out and starts in a fraction of the time)."""
    for setting in (all_settings() if methods else section_settings()).values():
        help_text = setting.help
        if setting.name == "method" and methods:
            help_text += f": {', '.join(selectable_names())}"
        elif methods and setting.name in method_settings():
            help_text += f" (default: {setting.default}; {' and '.join(readers(setting.name))})"
        elif setting.kind is not bool and setting.default not in ("", None):
            help_text += f" (default: {setting.default})"
        if setting.kind is bool:
            parser.add_argument("--" + setting.name, action="store_true", default=None, dest=setting.field, help=help_text)
        else:
            parser.add_argument("--" + setting.name, type=setting.kind, default=None, dest=setting.field,
                                metavar=setting.field.upper(), help=help_text)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings given on the command line, by snake-case name."""
    names = [s.field for s in all_settings().values()]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given: dict[str, Any] = preset_settings(args.preset) if args.preset else {}
    flags = given_flags(args)
    method = flags.get("method", given.get("method", "replay"))
    for name in list(given):  # a preset's method settings apply only where a method of the run reads them
        readers_of = readers(name.replace("_", "-"))
        if readers_of and name not in flags and not set(readers_of) & set(method.split("+")):
            given.pop(name)
    given.update(flags)
    if "data_dir" not in given and os.environ.get(DATA_DIR_ENV):
        given["data_dir"] = os.environ[DATA_DIR_ENV]
    config = RunConfig.from_mapping(given)
    unread = config.methods.unread([name.replace("_", "-") for name in flags])
    if unread:
        raise FedtideError(unread)
    if not config.run.out:
        from server.run_folder import default_run_dir

        config = config.replace(out=str(default_run_dir(config)))
    return config
