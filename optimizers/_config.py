"""Optimizer hyperparameters: how a config dataclass declares and validates them.

Every optimizer has one keyword-only dataclass deriving from :class:`OptimizerConfig`; each of
its fields is declared with :func:`option` (default, one-line doc, allowed range) and typed with
its annotation (``float``, ``int``, ``bool``, ``str``, a :class:`enum.StrEnum` of choices,
``X | None``, ``list[str]``).  A frequency declared with ``schedule=True`` is an ``int`` in
config files and may also be a callable ``step -> int`` in the Python API (:data:`Schedule`).
The annotations are the ones OmegaConf supports, so a config class serves as a Hydra
ConfigStore schema as it is (``optimizers`` itself never imports Hydra; a schema also shows the
``init=False`` fields a method derives, and :meth:`OptimizerConfig.build` drops them when they
hold their default).  :meth:`OptimizerConfig.__post_init__` checks every field against its
annotation and range, converts a choice string to its enum member, and then runs the class's
:meth:`~OptimizerConfig.check` for rules that relate fields.  A bad value raises
:class:`OptimizerConfigError` naming the key (``optimizer.<key> must be ..., got ...``).

Declaring a config::

    @dataclass(kw_only=True)
    class ToyConfig(OptimizerConfig):
        lr: float = option(0.1, "step size", ge=0)
        form: Form = option(Form.exact, "which approximation")
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Self

__all__ = [
    "FieldKind",
    "OptimizerConfig",
    "OptimizerConfigError",
    "Schedule",
    "field_kinds",
    "option",
    "option_fields",
]

#: a frequency: an int >= 1, or (Python API only) a callable ``step -> int >= 1``
Schedule = int | Callable[[int], int]


class OptimizerConfigError(ValueError):
    """A bad optimizer name or hyperparameter; the message names the key and the fix."""


def option(
    default: Any = MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    schedule: bool = False,
    init: bool = True,
) -> Any:
    """A config field: ``default``, a one-line ``doc`` and an optional range (``ge``/``gt`` lower,
    ``le``/``lt`` upper bound).  ``schedule=True``: an int >= 1 or (Python API) a callable
    ``step -> int``.  ``init=False``: derived by the config, not a user key."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "schedule": schedule}
    return field(default=default, metadata=meta, init=init)


def redefault(base: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``base`` with a method's own ``default`` (doc and range kept)."""
    f = next(f for f in dataclasses.fields(base) if f.name == name)
    return field(default=default, metadata=f.metadata, init=f.init)


def option_fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    """The user-settable fields of a config class (``init=False`` ones are derived)."""
    return tuple(f for f in dataclasses.fields(cls) if f.init)


def _fail(key: str, what: str, value: Any) -> OptimizerConfigError:
    return OptimizerConfigError(f"optimizer.{key} must be {what}, got {value!r}")


def _range_text(meta: Mapping[str, Any], kind: str) -> str | None:
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta.get("gt"))
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta.get("lt"))
    if lo[1] is not None and hi[1] is not None:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    noun = "an int" if kind == "int" else "a number"
    if lo[1] is not None:
        return f"{noun} {'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi[1] is not None:
        return f"{noun} {'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return None


def _in_range(v: float, meta: Mapping[str, Any]) -> bool:
    if math.isnan(v):
        return False
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    return (
        (ge is None or v >= ge)
        and (gt is None or v > gt)
        and (le is None or v <= le)
        and (lt is None or v < lt)
    )


@dataclass(frozen=True)
class FieldKind:
    """A field's annotation, read once per class."""

    #: bool, int, float, str, a StrEnum subclass, or list (of str)
    base: Any
    #: ``None`` allowed (YAML ``null``)
    optional: bool
    #: int >= 1, or a callable ``step -> int`` (Python API only)
    schedule: bool


def _kind(tp: Any, schedule: bool) -> FieldKind:
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or (
        typing.get_origin(tp) is typing.Union
    ) else (tp,)
    optional = type(None) in args
    rest = [a for a in args if a is not type(None)]
    base = rest[0] if rest else Any
    if typing.get_origin(base) is list:
        base = list
    return FieldKind(base, optional, schedule)


_KINDS: dict[type, dict[str, FieldKind]] = {}


def field_kinds(cls: type) -> dict[str, FieldKind]:
    """Each field's :class:`FieldKind` (read once per class): what a schema builder needs,
    e.g. a Hydra ConfigStore schema types a ``schedule`` field as ``int``."""
    if cls not in _KINDS:
        hints = typing.get_type_hints(cls)
        _KINDS[cls] = {
            f.name: _kind(hints[f.name], bool(f.metadata.get("schedule")))
            for f in dataclasses.fields(cls)
        }
    return _KINDS[cls]


def check_field(
    key: str, value: Any, kind: FieldKind, meta: Mapping[str, Any], default: Any
) -> Any:
    """``value`` checked against its annotation and range; returns it (a choice string as its
    enum member, a single name as a one-name list)."""
    if value is None and kind.optional:
        return None
    base = kind.base
    if kind.schedule:
        if callable(value):
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(key, "an int >= 1 or a callable step -> int", value)
        return value
    if isinstance(base, type) and issubclass(base, enum.Enum):
        choices = [m.value for m in base]
        if value not in choices:
            null = "null or " if kind.optional else ""
            raise _fail(key, f"{null}one of {', '.join(choices)}", value)
        return base(value)
    if base is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _fail(key, "a list of module names or classes", value)
        return list(value)
    numeric = base in (int, float)
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        name = getattr(base, "__name__", str(base)) + (" or null" if kind.optional else "")
        raise _fail(key, f"of type {name} (default {default!r})", value)
    if numeric:
        rng = _range_text(meta, base.__name__)
        if rng is not None and not _in_range(float(value), meta):
            raise _fail(key, ("null or " if kind.optional else "") + rng, value)
    return value


@dataclass(kw_only=True)
class OptimizerConfig:
    """Base of the optimizer config dataclasses (see the module docstring)."""

    def __post_init__(self) -> None:
        kinds = field_kinds(type(self))
        for f in option_fields(type(self)):
            value = check_field(f.name, getattr(self, f.name), kinds[f.name], f.metadata, f.default)
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules that relate fields (override; raise with :meth:`fail`)."""

    @staticmethod
    def fail(key: str, what: str, value: Any) -> OptimizerConfigError:
        """The error for ``optimizer.<key> must be <what>, got <value>`` (raise it)."""
        return _fail(key, what, value)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The user-settable keys, in declaration order."""
        return tuple(f.name for f in option_fields(cls))

    @classmethod
    def docs(cls) -> dict[str, str]:
        """One-line doc per user-settable key."""
        return {f.name: str(f.metadata.get("doc", "")) for f in option_fields(cls)}

    @classmethod
    def build(
        cls, config: OptimizerConfig | None = None, hparams: Mapping[str, Any] | None = None,
        *, label: str | None = None,
    ) -> Self:
        """``config`` (default: the defaults) with ``hparams`` overriding it; an unknown key
        raises naming the valid ones."""
        hparams = dict(hparams or {})
        for f in dataclasses.fields(cls):
            if not f.init and f.name in hparams:  # a derived field, e.g. echoed by a schema
                if hparams.pop(f.name) != f.default:
                    raise OptimizerConfigError(
                        f"optimizer.{f.name} cannot be set for {label or cls.__name__}: "
                        f"{f.metadata.get('doc', 'derived')}"
                    )
        unknown = sorted(set(hparams) - set(cls.keys()))
        if unknown:
            raise OptimizerConfigError(
                f"optimizer.{unknown[0]} is not a hyperparameter of {label or cls.__name__}; "
                "valid keys: " + ", ".join(cls.keys())
            )
        if config is None:
            return cls(**hparams)
        if not isinstance(config, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **hparams) if hparams else config

    def to_dict(self) -> dict[str, Any]:
        """User-settable values (choices as plain strings)."""
        out = {}
        for f in option_fields(type(self)):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out
