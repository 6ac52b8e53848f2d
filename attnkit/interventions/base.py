"""Interventions as data: a dataclass of hyper-parameters plus the callbacks it needs, registered by name.

An intervention declares its parameters as dataclass fields; ``param(default, low=, high=, choices=)``
records the allowed values, checked when the object is built (from Python or from a spec string).
Spec strings are what the CLI and the ablation scripts use::

    "fastv:k=2,keep=0.5"      -> FastV(k=2, keep=0.5)
    "record:layers=0+3"       -> Record(layers=(0, 3))      (tuples join values with '+')
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from attnkit.hooks.attention import AttentionCall
    from attnkit.hooks.handle import WrapContext

REGISTRY: dict[str, type[Intervention]] = {}


def param(default, *, low=None, high=None, low_open=False, high_open=False, choices=None, doc: str = ""):
    """A dataclass field with allowed values: ``low``/``high`` bounds (open or closed) or ``choices``."""
    meta = dict(low=low, high=high, low_open=low_open, high_open=high_open, choices=choices, doc=doc)
    return dataclasses.field(default=default, metadata=meta)


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make ``cls`` buildable from its ``name`` in spec strings."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"intervention name {cls.name!r} is already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass
class Intervention:
    """Base of all interventions. Subclasses are dataclasses with a ``name`` and override what they need.

    Callbacks (all optional):
    - ``attach(ctx)``: at ``wrap()``; check the model, install hooks through ``ctx.installed``.
    - ``attention_layers(ctx)``: decoder layers whose attention calls go to ``on_attention``.
    - ``on_attention(call)``: read or edit one attention call of such a layer.
    - ``conflicts_with(other)``: a reason why the two cannot be combined, or None.
    - ``reset()``: at each prefill (a new ``generate()``/forward on a fresh cache).
    - ``stats()``: what it did in the last forward/generate.

    ``batchable``: whether each sample of a padded batch gets the answer it gets alone (the eval runner runs a
    method that sets it False at batch size 1, and says so). ``files``: the parameters that name a file or
    folder whose CONTENT decides the result (calibrations); the eval stores key their rows by that content.
    """

    name: ClassVar[str] = ""
    batchable: ClassVar[bool] = True
    files: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(self.name, f.name, value, hints[f.name])
            _check_range(self.name, f, value)

    def attach(self, ctx: WrapContext) -> None:
        pass

    def attention_layers(self, ctx: WrapContext) -> Iterable[int]:
        return ()

    def on_attention(self, call: AttentionCall) -> None:
        pass

    def conflicts_with(self, other: Intervention) -> str | None:
        """Why this cannot be installed together with ``other`` (checked both ways at ``wrap()``), or None."""
        return None

    def reset(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def spec(self) -> str:
        """The spec string that rebuilds this object."""
        parts = [f"{f.name}={_format(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(parts) if parts else "")


def _format(value) -> str:
    if isinstance(value, tuple):
        return "+".join(str(v) for v in value)
    return str(value)


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    lo, hi = m.get("low"), m.get("high")
    left = "(" if m.get("low_open") else "["
    right = ")" if m.get("high_open") else "]"
    return f"in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _bounded(f: dataclasses.Field) -> bool:
    m = f.metadata
    return bool(m) and (m.get("choices") is not None or m.get("low") is not None or m.get("high") is not None)


def _check_range(name: str, f: dataclasses.Field, value) -> None:
    m = f.metadata
    if value is None or not m:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        bad = (m.get("choices") and v not in m["choices"])
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = m.get("low"), m.get("high")
            bad = bad or (lo is not None and (v <= lo if m.get("low_open") else v < lo))
            bad = bad or (hi is not None and (v >= hi if m.get("high_open") else v > hi))
        if bad:
            raise ValueError(f"{name}: {f.name}={v!r} is out of range; allowed: {_allowed(f)}")


def _type_args(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _check_type(name: str, field: str, value, hint) -> None:
    ok = False
    for t in _type_args(hint):
        origin = typing.get_origin(t)
        if t is type(None):
            ok = ok or value is None
        elif origin is tuple:
            (item,) = {a for a in typing.get_args(t) if a is not Ellipsis}
            ok = ok or (isinstance(value, tuple) and all(_is(v, item) for v in value))
        else:
            ok = ok or _is(value, t)
    if not ok:
        raise TypeError(f"{name}: {field}={value!r} has the wrong type; expected {_type_name(hint)}")


def _is(value, t) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def _type_name(hint) -> str:
    return " | ".join(getattr(t, "__name__", str(t)) if typing.get_origin(t) is None else str(t)
                      for t in _type_args(hint)).replace("NoneType", "None")


def _parse_value(name: str, field: str, text: str, hint):
    """Convert ``text`` to the field's type; int before float so that ``keep=64`` is a count, ``0.5`` a ratio."""
    args = _type_args(hint)
    if text.lower() == "none" and type(None) in args:
        return None
    for t in args:
        origin = typing.get_origin(t)
        try:
            if origin is tuple:
                (item,) = {a for a in typing.get_args(t) if a is not Ellipsis}
                return tuple(_parse_scalar(p, item) for p in text.split("+"))
            if t is not type(None):
                return _parse_scalar(text, t)
        except ValueError:
            continue
    raise ValueError(f"{name}: cannot read {field}={text!r} as {_type_name(hint)}")


def _parse_scalar(text: str, t):
    if t is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(text)
    if t is int:
        return int(text)
    if t is float:
        return float(text)
    if t is str:
        return text
    raise ValueError(text)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:a=1,b=2"`` -> ``("name", {"a": "1", "b": "2"})``."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad parameter {item!r} in {spec!r}; write name:param=value,param=value")
        if key.strip() in params:
            raise ValueError(f"parameter {key.strip()!r} given twice in {spec!r}")
        params[key.strip()] = value.strip()
    return name.strip(), params


def build(spec: str | Intervention) -> Intervention:
    """An intervention from an object (returned as is) or a registry spec string."""
    if isinstance(spec, Intervention):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"an intervention is an attnkit Intervention or a spec string, not {type(spec).__name__}")
    name, raw = parse_spec(spec)
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown intervention {name!r}; available: {', '.join(sorted(REGISTRY))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, text in raw.items():
        if key not in fields:
            raise ValueError(f"{name}: unknown parameter {key!r}; parameters: {', '.join(fields) or 'none'}")
        kwargs[key] = _parse_value(name, key, text, hints[key])
    return cls(**kwargs)


def available() -> dict[str, dict[str, Any]]:
    """Registered interventions: ``{name: {"doc": first docstring line, "params": {param: (default, allowed)}}}``."""
    out = {}
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        hints = typing.get_type_hints(cls)
        params = {f.name: {"default": f.default, "type": _type_name(hints[f.name]),
                           "allowed": _allowed(f) if _bounded(f) else "any", "doc": f.metadata.get("doc", "")}
                  for f in dataclasses.fields(cls)}
        first = (cls.__doc__ or "").strip().split("\n\n")[0]     # the docstring's first paragraph, on one line
        out[name] = {"doc": " ".join(first.split()), "params": params}
    return out
