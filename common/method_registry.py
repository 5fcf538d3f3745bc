"""The continual-learning methods a run may name, and the settings each declares.

A method is one class (``client.methods.Method``) that declares its ``name``, its
``settings`` (``common.settings.Setting``), whether it ``keeps_memory``, whether rounds using
it can be ``vectorized``, and what it cannot be combined with. ``register_method`` adds it;
CLI flags, help, validation, the run config check and bench cells all read this registry,
so a new method touches its own file and its test.

The built-in methods are the modules of the ``client.methods`` package; like the components of
a Flower app the package is named here by its path and its modules are imported on first use,
so that ``common`` needs no import of ``client`` and any boundary (CLI, ServerApp, ClientApp,
tests) sees the same methods. A new built-in is a new module there; nothing else lists it.
Hooks run in the order of each class's ``order`` (then registration).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Protocol

from common.errors import FedtideError
from common.settings import Setting

BUILTIN_PACKAGE = "client.methods"
NAIVE = "naive"  # no method: plain fine-tuning

_registry: dict[str, "MethodClass"] = {}
_loaded = False


class MethodClass(Protocol):
    name: str
    settings: tuple[Setting, ...]
    keeps_memory: bool
    vectorized: bool
    selectable: bool
    excludes: tuple[str, ...]

    @classmethod
    def active(cls, parts: tuple[str, ...], options: dict[str, Any]) -> bool: ...

    @classmethod
    def check(cls, parts: tuple[str, ...], options: dict[str, Any], context: dict[str, Any]) -> None: ...


def register_method(cls: Any) -> Any:
    """Class decorator: make a method available to ``--method`` and every other boundary."""
    existing = _registry.get(cls.name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a method named '{cls.name}' is registered already ({existing.__module__})")
    for setting in cls.settings:  # methods may share a setting (der reads replay's), never redefine it
        other = next((s for c in _registry.values() for s in c.settings if s.name == setting.name), None)
        if other is not None and other != setting:
            raise ValueError(f"method '{cls.name}' redefines setting '{setting.name}'")
    _registry[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method added with ``register_method`` (a test's, or a plugin's that unloads)."""
    if registered().get(name) is not None and _registry[name].__module__.startswith(BUILTIN_PACKAGE + "."):
        raise ValueError(f"'{name}' is a built-in method")
    _registry.pop(name, None)


def registered() -> dict[str, MethodClass]:
    """Every method, in the order their hooks run in a round (each class's ``order``, then
    registration): replay or der, ewc, lwf, prox, then methods without an order of their own."""
    _load_builtins()

    def order(item: tuple[int, tuple[str, MethodClass]]) -> tuple[int, int]:
        index, (_, cls) = item
        return (getattr(cls, "order", 100), index)

    return dict(pair for _, pair in sorted(enumerate(_registry.items()), key=order))


def selectable_names() -> tuple[str, ...]:
    return (NAIVE, *(name for name, cls in registered().items() if cls.selectable))


def method_settings() -> dict[str, Setting]:
    """Every method setting by flag name."""
    out: dict[str, Setting] = {}
    for cls in registered().values():
        for setting in cls.settings:
            out.setdefault(setting.name, setting)
    return out


def readers(setting: str) -> list[str]:
    """The methods that read ``setting``."""
    return [name for name, cls in registered().items() if any(s.name == setting for s in cls.settings)]


def parse_method(method: str) -> tuple[str, ...]:
    """``replay+ewc`` -> ("replay", "ewc"); FedtideError for an unknown or impossible mix."""
    known = selectable_names()
    parts = tuple(method.split("+"))
    for part in parts:
        if part not in known:
            raise FedtideError(
                f"unknown method '{part}' in --method {method}: use one of {', '.join(known)}, "
                "or combine them with '+' (e.g. replay+ewc)"
            )
    if NAIVE in parts and len(parts) > 1:
        raise FedtideError(f"--method {method}: 'naive' means no continual-learning method and cannot be combined; drop it")
    for part in parts:
        for other in getattr(registered().get(part), "excludes", ()):
            if other in parts:
                raise FedtideError(f"--method {method}: {registered()[part].exclusion_reason(other)}")
    return tuple(p for p in parts if p != NAIVE)


def active_methods(parts: tuple[str, ...], options: dict[str, Any]) -> list[MethodClass]:
    """The methods a run uses, in hook order: those named, and those its settings turn on."""
    return [cls for cls in registered().values() if cls.active(parts, options)]


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        package = importlib.import_module(BUILTIN_PACKAGE)
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{BUILTIN_PACKAGE}.{module.name}")


class MethodSettings:
    """The method section: ``--method`` and the methods' own settings that were given (by flag
    name; one at its default counts as not given, so equal settings compare equal)."""

    __slots__ = ("method", "given")

    def __init__(self, method: str = "replay", given: dict[str, Any] | None = None) -> None:
        known = method_settings()
        for name in given or {}:
            if name not in known:
                raise FedtideError(f"unknown method setting '{name}': the methods' settings are {', '.join(known)}")
        parsed = {name: known[name].parse(value) for name, value in (given or {}).items()}
        object.__setattr__(self, "method", str(method))
        object.__setattr__(self, "given", {k: v for k, v in parsed.items() if v != known[k].default})
        # a setting that no method of the run reads changes nothing: it is not kept (the CLI
        # refuses such a flag when it was typed, see ``unread``)
        read = {s.name for cls in self.active for s in cls.settings}
        object.__setattr__(self, "given", {k: v for k, v in self.given.items() if k in read})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MethodSettings is frozen")

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt through __init__ (pickle would set the slots one by one, which is refused):
        # how a config reaches the processes of ``fedtide bench --jobs N`` and of worker pools
        return (MethodSettings, (self.method, dict(self.given)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodSettings) and (self.method, self.given) == (other.method, other.given)

    def __hash__(self) -> int:
        return hash((self.method, tuple(sorted(self.given.items()))))

    def __repr__(self) -> str:
        return f"MethodSettings({self.method!r}, {self.given!r})"

    @property
    def parts(self) -> tuple[str, ...]:
        """``replay+ewc`` -> ("replay", "ewc"); () for naive."""
        return parse_method(self.method)

    @property
    def options(self) -> dict[str, Any]:
        """Every method setting by flag name: the given ones, the defaults for the rest."""
        return {name: self.given.get(name, s.default) for name, s in method_settings().items()}

    @property
    def active(self) -> list[MethodClass]:
        return active_methods(self.parts, self.options)

    @property
    def vectorized(self) -> bool:
        return all(cls.vectorized for cls in self.active)

    def unread(self, names: list[str]) -> str | None:
        """Why a typed flag among ``names`` (method settings) is wrong for this run: no method
        of it reads the setting; None when every one is read."""
        read = {s.name for cls in self.active for s in cls.settings}
        for name in names:
            if name in method_settings() and name not in read:
                users = " or ".join(readers(name)) or "none"
                return f"--{name} is set but --method {self.method} does not use it: drop --{name} or use a method that reads it ({users})"
        return None

    def check(self, context: dict[str, Any]) -> None:
        """Each method's own rules against the run's other settings (``context``, by field name)."""
        options = self.options
        for cls in self.active:
            cls.check(self.parts, options, context)

    def to_flat(self) -> dict[str, Any]:
        return {"method": self.method, **self.options}

    @classmethod
    def from_flat(cls, mapping: dict[str, Any]) -> "MethodSettings":
        known = method_settings()
        return cls(mapping.get("method", "replay"), {name: value for name, value in mapping.items() if name in known})
