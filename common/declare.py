"""Configuration declared once: dataclass fields that carry their key, default, rule and help.

As PEFT's ``LoraConfig`` does, every configuration value is one dataclass field; :func:`option` puts
its outside name (the kebab-case key of a Flower run config or a TOML policy), the rule it must meet
and a help text in the field's metadata. Sub-configs are fields of a dataclass type (:func:`section`).
Everything else is derived from that one declaration: the parser (:func:`parse`, every problem at once,
each naming the key, the rule and the default), the flat defaults (:func:`defaults`, e.g. for
``pyproject.toml``), the flat values (:func:`flatten`, e.g. for a request record), a commented TOML
template (:func:`toml_template`) and the documentation table (:func:`markdown_table`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

__all__ = [
    "Rule",
    "Spec",
    "above",
    "at_least",
    "defaults",
    "flatten",
    "fraction",
    "markdown_table",
    "one_of",
    "option",
    "parse",
    "section",
    "specs",
    "toml_template",
    "within",
]

Check = Callable[[Any], bool]
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Rule:
    """What a value must be: the words users read and the check that enforces them, declared together.

    ``text`` may hold ``{kind}``, filled in by :func:`option` from the default's type ("an integer" or
    "a number"); ``check`` ``None`` means the type alone is the rule (e.g. "true or false").
    """

    text: str
    check: Check | None = None


def _num(x: float) -> str:
    """``1e6`` as ``1e6``, ``1e-3`` as ``1e-3``, ``0.5`` as ``0.5``, ``100000`` as ``100000``."""
    if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e5):
        return str(int(x))
    if 1e-2 <= abs(x) < 1e5:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _noted(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


def at_least(low: float, *, note: str = "") -> Rule:
    """``x >= low``."""
    return Rule(_noted(f"{{kind}} >= {_num(low)}", note), lambda x: bool(x >= low))


def above(low: float, *, note: str = "") -> Rule:
    """``x > low``."""
    return Rule(_noted(f"{{kind}} > {_num(low)}", note), lambda x: bool(x > low))


def within(low: float, high: float, *, open_low: bool = False, note: str = "") -> Rule:
    """``low <= x <= high`` (``low < x`` with ``open_low``)."""
    text = f"{{kind}} in {'(' if open_low else '['}{_num(low)}, {_num(high)}]"
    if open_low:
        return Rule(_noted(text, note), lambda x: bool(low < x <= high))
    return Rule(_noted(text, note), lambda x: bool(low <= x <= high))


def fraction(high: float = 1.0, *, open_high: bool = False, note: str = "") -> Rule:
    """``0 < x <= high`` (``x < high`` with ``open_high``)."""
    text = f"a fraction in (0, {_num(high)}{')' if open_high else ']'}"
    if open_high:
        return Rule(_noted(text, note), lambda x: bool(0 < x < high))
    return Rule(_noted(text, note), lambda x: bool(0 < x <= high))


def one_of(choices: Sequence[str]) -> Rule:
    """``x in choices``."""
    options = tuple(choices)
    return Rule(f"one of {', '.join(options)}", lambda x: x in options)


def option(key: str, default: Any, help: str, rule: Rule | None = None) -> Any:
    """A configuration field: its outside ``key``, ``default``, ``help`` and the :class:`Rule` it meets."""
    rule = rule or Rule("")
    kind = "an integer" if isinstance(default, int) and not isinstance(default, bool) else "a number"
    meta = {"key": key, "help": help, "rule": rule.text.replace("{kind}", kind), "check": rule.check}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str = "") -> Any:
    """A field holding a sub-config (its keys are read from the same flat mapping)."""
    return field(default_factory=cls, metadata={"section": True, "help": help})


@dataclass(frozen=True)
class Spec:
    """One declared key: where it lives (``path`` of attribute names), its type and rule."""

    key: str
    path: tuple[str, ...]
    kind: type
    default: Any
    help: str
    rule: str
    check: Check | None
    optional: bool  # None is a valid value (``float | None``)


def _kind(hint: Any) -> tuple[type, bool]:
    """The scalar type of a field annotation, and whether ``None`` is allowed."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0])[0], True
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return list, False
    if origin is dict or hint is dict:
        return dict, False
    return hint, False


_SPECS: dict[type, tuple[Spec, ...]] = {}


def specs(cls: type) -> tuple[Spec, ...]:
    """Every key declared by ``cls`` and its sections, depth first (computed once per class)."""
    if cls not in _SPECS:
        _SPECS[cls] = _specs(cls)
    return _SPECS[cls]


def _specs(cls: type) -> tuple[Spec, ...]:
    hints = typing.get_type_hints(cls)
    out: list[Spec] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            out += [dataclasses.replace(s, path=(f.name, *s.path)) for s in specs(hints[f.name])]
        elif "key" in f.metadata:
            kind, optional = _kind(hints[f.name])
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            m = f.metadata
            out.append(Spec(m["key"], (f.name,), kind, default, m["help"], m["rule"], m["check"], optional))
    return tuple(out)


def _coerce(spec: Spec, value: Any) -> tuple[Any, str | None]:
    """``value`` as ``spec.kind``, or the problem."""
    kind = spec.kind
    if value is None and spec.optional:
        return None, None
    if kind is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true", None
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                return value, "must be a number, got an integer too large for a number"
            if math.isfinite(number):
                return number, None
    elif kind is str and isinstance(value, str):
        return value, None
    elif kind is dict:
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value), None
        return value, f'must be a table of text values (e.g. {{ DATE_TIME = "redact" }}), got {_short(value)}'
    elif kind is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value), None
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip()), None
    return value, f"must be {_KINDS.get(kind, kind.__name__)}, got {_short(value)}"


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (values may come from a hostile peer)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build(cls: type, values: Mapping[tuple[str, ...], Any], prefix: tuple[str, ...] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            kwargs[f.name] = _build(hints[f.name], values, (*prefix, f.name))
        elif "key" in f.metadata:
            kwargs[f.name] = values[(*prefix, f.name)]
    return cls(**kwargs)


def parse(
    cls: type,
    raw: Mapping[str, Any],
    source: str,
    *,
    required: Sequence[str] = (),
    ignore: Sequence[str] = (),
) -> Any:
    """Build ``cls`` from a flat key -> value mapping; raise ``ConfigError`` listing every problem.

    Missing keys take their default (those in ``required`` are a problem); keys in ``ignore`` may be
    present and are skipped; every other unknown key is a problem with the closest known key. A
    ``problems()`` method of the result adds its cross-field problems.
    """
    declared = specs(cls)
    known = {s.key: s for s in declared}
    problems: list[str] = []
    for name in raw:
        if name not in known and name not in ignore:
            close = difflib.get_close_matches(str(name)[:100], list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; accepted: {', '.join(known)}"
            problems.append(f"unknown key {_short(str(name))}{hint}".replace('"', "'"))
    values: dict[tuple[str, ...], Any] = {}
    for spec in declared:
        if spec.key not in raw:
            if spec.key in required:
                problems.append(
                    f"'{spec.key}' is required: set it to {spec.rule or _KINDS.get(spec.kind, 'a value')}"
                )
            values[spec.path] = spec.default
            continue
        value, problem = _coerce(spec, raw[spec.key])
        if problem is None and value is not None and spec.check is not None and not spec.check(value):
            problem = f"must be {spec.rule}, got {_short(value)}"
        if problem is not None:
            default = (
                f" (default: {spec.default!r})" if spec.default not in (None, "") or spec.kind is str else ""
            )
            problems.append(f"'{spec.key}' {problem}{default if spec.key not in required else ''}")
        values[spec.path] = value
    if problems:
        raise ConfigError(source, problems)
    built = _build(cls, values)
    cross = built.problems() if hasattr(built, "problems") else []
    if cross:
        raise ConfigError(source, cross)
    return built


def defaults(cls: type) -> dict[str, Any]:
    """Every key of ``cls`` with its default (as Flower or TOML would hold it)."""
    return {s.key: list(s.default) if isinstance(s.default, tuple) else s.default for s in specs(cls)}


def flatten(obj: Any) -> dict[str, Any]:
    """The flat key -> value mapping of a built config (inverse of :func:`parse`)."""
    out = {}
    cls: type = type(obj)
    for spec in specs(cls):
        value = obj
        for name in spec.path:
            value = getattr(value, name)
        out[spec.key] = list(value) if isinstance(value, tuple) else value
    return out


def toml_template(sections: Mapping[str, type], values: Mapping[str, Mapping[str, Any]]) -> str:
    """A commented TOML file of ``sections`` (table name -> declaration) with ``values`` set.

    Keys in ``values`` are written as given; the others as their defaults; an optional key without a
    default (its value derived, e.g. from another key) is written as a comment.
    """
    import tomli_w

    lines: list[str] = []
    for table, cls in sections.items():
        lines.append(f"[{table}]")
        given = values.get(table, {})
        for spec in specs(cls):
            lines.append(f"# {spec.help}" + (f": {spec.rule}" if spec.rule else ""))
            value = given.get(spec.key, spec.default)
            if value is None:
                lines.append(f"# {spec.key} = ...")
                continue
            value = list(value) if isinstance(value, tuple) else value
            lines.append(
                tomli_w.dumps({spec.key: value}).strip()
                if not isinstance(value, dict)
                else _inline(spec.key, value)
            )
        lines.append("")
    return "\n".join(lines)


def _inline(key: str, table: Mapping[str, str]) -> str:
    import json

    return (
        f"{key} = {{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"
        if table
        else f"{key} = {{}}"
    )


def markdown_table(cls: type, prefix: str = "") -> str:
    """| key | default | rule | meaning | of every key of ``cls`` (for the docs)."""
    rows = ["| key | default | rule | meaning |", "|---|---|---|---|"]
    for s in specs(cls):
        default = "(derived)" if s.default is None else f"`{flatten_value(s.default)}`"
        rule, meaning = s.rule.replace("|", "\\|"), s.help.replace("|", "\\|")
        rows.append(f"| `{prefix}{s.key}` | {default} | {rule} | {meaning} |".replace("\n", " "))
    return "\n".join(rows) + "\n"


def flatten_value(value: Any) -> str:
    """A default as a user would write it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(value)
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
