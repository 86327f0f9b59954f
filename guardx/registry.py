"""One registry kind for models, objectives, attacks, distillers and stages.

An entry is a plain factory (function or class) registered with a decorator; it declares

* its **parameters**: the factory's keyword arguments with defaults (types and defaults come from the
  signature, so there is no second list), and for the ones a user sets from a config file a one-line
  help string (``params={"h": "step along z"}``); config sections are generated from these;
* its **capabilities**: free keyword flags (``bounded=False``, ``source="torchattacks"``, ...) other code
  reads instead of checking class names.

Every registry behaves the same: registering a name twice is an error, and an unknown name is a one-line
:class:`~guardx.errors.ConfigError` with a did-you-mean.

    OBJECTIVES = Registry("objective")

    @OBJECTIVES.register("gradnorm", params={"lam_g": "weight of ||grad_x loss||^2"})
    class GradNorm: ...

    OBJECTIVES.build("gradnorm", lam_g=0.1)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from guardx.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Interval:
    """The allowed values of a numeric setting, written as in mathematics: ``[0, 1]``, ``(0, inf)``,
    ``[1, inf)``. Registry entries and config fields declare one; :meth:`check` gives the one-line error.
    A tuple ``(low, high)`` means the closed interval (``None`` = unbounded); ``"pixels"`` is [0, 1] for
    a radius or step in pixel units (ε, α), whose error suggests k/255 for a value in (1, 255]."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    pixels: bool = False

    @classmethod
    def of(cls, spec) -> "Interval | None":
        """``None``, an :class:`Interval`, a ``(low, high)`` tuple (closed), ``"pixels"`` or a string such as
        ``"(0, 1]"``."""
        if spec is None or isinstance(spec, Interval):
            return spec
        if spec == "pixels":
            return cls(0, 1, pixels=True)
        if isinstance(spec, tuple):
            lo, hi = spec
            return cls(lo, hi)
        text = spec.replace(" ", "")
        if len(text) < 5 or text[0] not in "[(" or text[-1] not in "])" or "," not in text:
            raise ValueError(f"interval {spec!r} must look like [0, 1] or (0, inf)")
        lo, hi = text[1:-1].split(",")
        bound = lambda b: None if b in ("-inf", "inf") else float(b)  # noqa: E731
        return cls(bound(lo), bound(hi), lo_open=text[0] == "(", hi_open=text[-1] == ")")

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        text = f"{left}{lo}, {hi}{right}"
        return f"{text} in pixel units" if self.pixels else text

    def __contains__(self, v) -> bool:
        if v != v:  # NaN is in no interval
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def check(self, value: Any, where: str) -> None:
        """ConfigError if ``value`` (a number) is outside; ``where`` names the key. A pixel-unit value in
        (1, 255] gets the k/255 hint."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value in self:
            return
        hint = ""
        if self.pixels and 1 < value <= 255:
            hint = f" (did you mean {value:g}/255?)"
        raise ConfigError(f"{where}={value:g} is outside {self}{hint}")


@dataclass(frozen=True)
class Param:
    """A user-settable parameter of an entry: default and type from the factory's signature."""

    name: str
    default: Any
    type: type
    help: str
    key: str  # the config key it is read from (usually ``name``; attacks prefix theirs)
    range: Interval | None = None  # allowed values; checked by the config

    def check(self, value: Any, where: str) -> None:
        """ConfigError if ``value`` is outside :attr:`range` (``where`` names the key for the message)."""
        if self.range is not None:
            self.range.check(value, where)


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable
    params: dict[str, Param] = field(default_factory=dict)
    caps: dict[str, Any] = field(default_factory=dict)
    help: str = ""

    def __getattr__(self, cap: str) -> Any:  # entry.bounded, entry.source, ...
        try:
            return self.caps[cap]
        except KeyError:
            raise AttributeError(f"{self.name!r} declares no capability {cap!r}") from None


def _param_type(default: Any, annotation: Any) -> type:
    if default is not None and default is not inspect.Parameter.empty:
        return type(default)
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for t in (bool, int, float, str):  # "float | None" -> float
        if t.__name__ in str(text).split(" | ")[0]:
            return t
    return str


class Registry:
    """Name → :class:`Entry`; see the module docstring."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, *, params: dict[str, str] | None = None,
                 keys: dict[str, str] | None = None, ranges: dict[str, tuple] | None = None,
                 help: str = "", **caps) -> Callable:  # noqa: A002
        """Decorator. ``params``: help for each config-settable keyword argument of the factory;
        ``keys``: config key per parameter where it is not the parameter's name; ``ranges``: allowed
        values per numeric parameter, an :class:`Interval` spec (``"(0, inf)"``, or ``(low, high)`` closed)."""

        def deco(factory: Callable) -> Callable:
            entry_name = name or factory.__name__
            if entry_name in self._entries:
                raise ValueError(f"{self.kind} {entry_name!r} registered twice")
            signature = inspect.signature(factory)
            declared = {}
            for pname, text in (params or {}).items():
                p = signature.parameters.get(pname)
                if p is None or p.default is inspect.Parameter.empty:
                    raise TypeError(f"{self.kind} {entry_name!r}: documented parameter {pname!r} is not a keyword "
                                    "argument with a default of its factory")
                declared[pname] = Param(pname, p.default, _param_type(p.default, p.annotation), text,
                                        (keys or {}).get(pname, pname), Interval.of((ranges or {}).get(pname)))
            doc = help or (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[entry_name] = Entry(entry_name, factory, declared, dict(caps), doc)
            return factory

        return deco

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def get(self, name: str, where: str = "") -> Entry:
        """The entry; ``where`` (e.g. ``"model.name"``) prefixes the unknown-name error with the config key."""
        if name not in self._entries:
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown {self.kind} {name!r}{did_you_mean(str(name), self._entries)}; "
                              f"known: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, name: str, /, *args, **kwargs):
        """``factory(*args, **kwargs)`` for ``name``; ``None`` kwargs are dropped so the factory's defaults
        stay in effect (timm's convention); a keyword the factory does not take is a ConfigError."""
        entry = self.get(name)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        accepted = inspect.signature(entry.factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [k for k in kwargs if k not in accepted and not takes_any]
        if unknown:
            raise ConfigError(f"{self.kind} {name!r} takes no parameter {unknown[0]!r}"
                              f"{did_you_mean(unknown[0], list(accepted))}")
        return entry.factory(*args, **kwargs)

    def all_params(self) -> dict[str, list[tuple[Entry, Param]]]:
        """Config key → the (entry, parameter) pairs read from it, over every entry."""
        out: dict[str, list[tuple[Entry, Param]]] = {}
        for entry in self:
            for p in entry.params.values():
                out.setdefault(p.key, []).append((entry, p))
        return out
