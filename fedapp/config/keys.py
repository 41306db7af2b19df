"""Run-config keys as their owners declare them, and the one validator assembled from them.

A :class:`Key` says its type (its default's), default, allowed range or choices and help text. An
:class:`Owner` is the stage or module that reads a set of keys: it declares them (or ``reads`` keys
declared elsewhere), says when it is in use (``when``, in words ``needs``) and what must hold
between keys (``checks``). :func:`validate` reports every problem of a config at once, and refuses a
key set by the user whose owners are all out of use, whatever its value: a key that does nothing
is a mistake the user wants to hear about.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Value = bool | int | float | str


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Key:
    """One run-config key. ``choices`` may be a function (a registry's names, read when checked);
    ``plugin``: a ``"module:attribute"`` value is allowed besides the choices; ``check``: a problem
    with the value alone (``None`` when fine); ``when``/``needs``: when the key acts, if that is
    narrower than when its owner is in use."""

    name: str
    default: Value
    help: str
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    check: Callable[[Any], str | None] | None = None
    plugin: bool = False
    when: Callable[[Any], bool] | None = None
    needs: str = ""

    @property
    def attr(self) -> str:
        """The attribute name on the typed config (``-`` → ``_``)."""
        return self.name.replace("-", "_")

    @property
    def kind(self) -> type:
        return type(self.default)

    def allowed(self) -> tuple[str, ...]:
        choices = self.choices() if callable(self.choices) else self.choices
        return tuple(choices or ())

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (already of the right type) is not allowed, or None."""
        choices = self.allowed()
        if choices and value not in choices and not (self.plugin and ":" in str(value)):
            extra = ' or "module:attribute" (your own)' if self.plugin else ""
            return f"{self.name}={toml(value)} is not allowed: choose one of {', '.join(choices)}{extra}"
        if self.low is not None or self.high is not None:
            low = -float("inf") if self.low is None else self.low
            below = value <= low if self.low_open else value < low
            if below or (self.high is not None and value > self.high):
                bounds = f"{'(' if self.low_open else '['}{low}, {self.high if self.high is not None else 'inf'}]"
                return f"{self.name}={toml(value)} is out of range: allowed {bounds}"
        return self.check(value) if self.check else None

    def describe(self) -> str:
        """Allowed values in words, for the key reference."""
        if self.choices is not None:
            text = ", ".join(f"`{c}`" for c in self.allowed())
            return text + (', or `"module:attribute"`' if self.plugin else "")
        if self.low is not None or self.high is not None:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            return f"{'(' if self.low_open else '['}{low}, {high}]"
        return ""


Check = Callable[[Any], Iterable[str]]


@dataclass(frozen=True)
class Owner:
    """A stage or module that reads run-config keys."""

    name: str
    keys: tuple[Key, ...] = ()
    reads: tuple[str, ...] = ()
    when: Callable[[Any], bool] | None = None
    needs: str = ""
    checks: tuple[Check, ...] = ()

    def in_use(self, cfg: Any) -> bool:
        return self.when is None or bool(self.when(cfg))


def declared(owners: Sequence[Owner]) -> dict[str, Key]:
    """Every key by name, in declaration order; a key declared twice is a programming error."""
    keys: dict[str, Key] = {}
    for owner in owners:
        for key in owner.keys:
            if key.name in keys:
                raise RuntimeError(f"run-config key {key.name!r} is declared twice (second time by {owner.name})")
            keys[key.name] = key
    for owner in owners:
        missing = [name for name in owner.reads if name not in keys]
        if missing:
            raise RuntimeError(f"{owner.name} reads {missing}, which no owner declares")
    return keys


def owners_of(name: str, owners: Sequence[Owner]) -> list[Owner]:
    """The owners that declare or read key ``name``."""
    return [o for o in owners if name in o.reads or any(k.name == name for k in o.keys)]


def coerce(key: Key, value: Any) -> tuple[Any, str | None]:
    """``value`` as the key's type; TOML gives int for ``1`` where a float is meant, and a bool is
    an int to Python but never a number to the user."""
    kind = key.kind
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value, None
    return key.default, f"{key.name}={value!r} has the wrong type: expected {kind.__name__}"


def validate(
    run_config: Mapping[str, Any],
    owners: Sequence[Owner],
    make: Callable[[dict[str, Any]], Any],
    explicit: Iterable[str] | None = None,
) -> Any:
    """The typed config ``make(values)``, or one :class:`ConfigError` listing every problem.

    ``explicit``: the keys the user set; None means those whose value differs from the default
    (all a server can tell, since Flower hands it every key). A key the user set whose owners are
    all out of use is refused, whatever its value."""
    keys = declared(owners)
    problems = unknown_keys(run_config, keys)
    values: dict[str, Any] = {}
    bad = set()
    for name, key in keys.items():
        if name not in run_config:
            continue
        value, problem = coerce(key, run_config[name])
        problem = problem or key.problem(value)
        if problem:
            problems.append(problem)
            bad.add(name)
        else:
            values[key.attr] = value
    cfg = make(values)
    given = set(explicit) if explicit is not None else set()
    given |= {n for n, k in keys.items() if n in run_config and getattr(cfg, k.attr) != k.default}
    problems += unused_keys(cfg, [n for n in keys if n in given - bad], keys, owners)
    for owner in owners:
        if owner.in_use(cfg):
            for check in owner.checks:
                problems.extend(check(cfg))
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{len(problems)} problems in the run config:\n" + "\n".join(f"- {p}" for p in problems))
    return cfg


def unknown_keys(run_config: Mapping[str, Any], keys: Mapping[str, Key]) -> list[str]:
    """A problem for each key the app does not have, naming the closest valid key."""
    problems = []
    for name in run_config:
        if name not in keys:
            close = difflib.get_close_matches(str(name), list(keys), n=1, cutoff=0.6)
            hint = f": did you mean {close[0]!r}?" if close else " (`fedvideo config` lists every key)"
            problems.append(f"unknown key {name!r}{hint}")
    return problems


def unused_keys(cfg: Any, given: Sequence[str], keys: Mapping[str, Key], owners: Sequence[Owner]) -> list[str]:
    """A problem for each given key that nothing in use reads under ``cfg``."""
    problems = []
    for name in given:
        key = keys[name]
        mine = owners_of(name, owners)
        if any(o.in_use(cfg) for o in mine) and (key.when is None or key.when(cfg)):
            continue
        value = toml(getattr(cfg, key.attr))
        names = " / ".join(o.name for o in mine)
        if any(o.in_use(cfg) for o in mine):
            problems.append(f"{name}={value} does nothing here: {names} reads it only with {key.needs}")
        else:
            needs = key.needs or " or ".join(o.needs for o in mine if o.needs)  # the key's own is the narrower
            problems.append(
                f"{name}={value} belongs to {names}, which this config does not use: it acts only with {needs}"
            )
    return problems


def toml(value: Any) -> str:
    """A value as the user writes it in TOML (``"r3d_18"``, ``true``, ``0.5``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)
