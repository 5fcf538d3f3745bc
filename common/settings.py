"""One setting declared once: its flag name, type, default, help and constraints; sections of them.

A ``Setting`` turns a value from any boundary (a CLI flag, Flower's ``run_config``, a
``config.json``, a ``--set KEY=VALUE``) into the typed value, or raises ``FedtideError``
with a one-line message naming the flag and what to change. NaN and infinities never pass a
numeric setting unless it says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from common.errors import FedtideError


@dataclass(frozen=True)
class Setting:
    """``name`` is the kebab-case flag (``memory-size``); ``kind`` int, float, str or bool.

    ``minimum``/``maximum`` bound a number (``above``/``below`` make them exclusive);
    ``choices`` lists a string's allowed values; ``zero_means_default``: Flower's TOML
    run config has no null, so 0 there stands for "the default"."""

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    above: bool = False
    maximum: float | None = None
    below: bool = False
    zero_means_default: bool = False
    hint: str = ""  # said after a range error: what the values mean

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    def parse(self, value: Any) -> Any:
        """The typed, checked value; FedtideError naming the flag when it does not fit."""
        typed = self._coerce(value)
        if self.kind is str and self.choices and typed not in self.choices:
            raise FedtideError(f"unknown {self.name} '{typed}': use one of {', '.join(self.choices)}")
        if self.kind in (int, float):
            if (self.kind is int and abs(typed) >= 2**63) or (self.kind is float and not math.isfinite(typed)):
                raise FedtideError(f"--{self.name} must be a finite number of sensible size (got {str(value)[:40]})")
            low_ok = self.minimum is None or (typed > self.minimum if self.above else typed >= self.minimum)
            high_ok = self.maximum is None or (typed < self.maximum if self.below else typed <= self.maximum)
            if not (low_ok and high_ok):
                hint = f": {self.hint}" if self.hint else ""
                raise FedtideError(f"--{self.name} must be {self._range()} (got {value}){hint}")
        return typed

    def _range(self) -> str:
        def show(bound: float) -> str:
            return f"{int(bound):,}" if self.kind is int else f"{bound:g}"

        low, high = self.minimum, self.maximum
        if self.kind is int and low == 1 and not self.above:
            return "a positive integer" + (f" up to {show(high)}" if high is not None else "")
        whole = "a whole number " if self.kind is int else ""
        if low is not None and high is not None:
            if not (self.above or self.below):
                return f"{whole}between {show(low)} and {show(high)}"
            return f"{whole}in {'(' if self.above else '['}{show(low)}, {show(high)}{')' if self.below else ']'}"
        if low is not None:
            return f"{whole}{'>' if self.above else '>='} {show(low)}"
        return f"{whole}{'<' if self.below else '<='} {show(high)}"

    def _coerce(self, value: Any) -> Any:
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    if value.lower() in ("true", "1", "yes"):
                        return True
                    if value.lower() in ("false", "0", "no"):
                        return False
                    raise ValueError(value)
                if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                    return bool(value)
                raise ValueError(value)
            if self.kind is int:
                if isinstance(value, bool):
                    raise ValueError(value)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                if isinstance(value, str):
                    value = float(value) if any(c in value for c in ".eE") else value
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError(value)
                return int(value)
            if self.kind is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                return float(value)
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        except (TypeError, ValueError, OverflowError):
            raise FedtideError(f"setting '{self.name}' got {value!r}, expected {self.kind.__name__}") from None


def setting(default: Any, help: str, **constraints: Any) -> Any:
    """A section field declared with its help and constraints (``Setting``'s keywords); the
    flag name comes from the field's name and the type from its annotation."""
    return dataclasses.field(default=default, metadata={"help": help, "constraints": constraints})


class Section:
    """A frozen dataclass of settings declared with ``setting()``. Each value is checked when
    the section is made (type, range, choices, finite); ``check()`` adds the rules that
    involve several of its fields. ``SETTINGS`` lists the declarations by flag name."""

    SETTINGS: ClassVar[dict[str, Setting]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.SETTINGS = {}

    def __post_init__(self) -> None:
        for name, declared in self.declarations().items():
            object.__setattr__(self, declared.field, declared.parse(getattr(self, declared.field)))
        self.check()

    def check(self) -> None:
        """Rules across this section's fields; raise FedtideError naming the flags."""

    @classmethod
    def declarations(cls) -> dict[str, Setting]:
        if not cls.SETTINGS:
            kinds = {"int": int, "float": float, "str": str, "bool": bool}
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                if "help" not in f.metadata:
                    continue
                kind = kinds[str(f.type).split(" ")[0].split("|")[0].strip()]
                flag = f.name.replace("_", "-")
                cls.SETTINGS[flag] = Setting(flag, kind, f.default, f.metadata["help"], **f.metadata["constraints"])
        return cls.SETTINGS

    @classmethod
    def from_flat(cls, mapping: Mapping[str, Any]) -> Any:
        """The section from flat kebab-case settings; keys it does not declare are ignored."""
        declared = cls.declarations()
        return cls(**{s.field: mapping[name] for name, s in declared.items() if name in mapping})  # type: ignore[call-arg]

    def to_flat(self) -> dict[str, Any]:
        return {name: getattr(self, s.field) for name, s in self.declarations().items()}
