"""Read a parsed TOML document against an implicit schema while collecting every error.

`Reader` wraps one table and its key path ("listeners[1]"). Each typed getter looks a key up, converts
and checks it, records a message like `listeners[1].role: must be one of submission, ingress (got 'foo')`
on failure and returns the default, so one pass over the document reports every problem at once instead
of stopping at the first. `Reader.finish()` then reports the keys nobody asked for as unknown.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ._units import parse_duration, parse_size, typename

__all__ = [
    "Reader",
    "as_bool",
    "as_float",
    "as_int",
    "as_str",
    "check_unique",
    "ranged",
    "resolve_path",
    "typename",
]

T = TypeVar("T")
S = TypeVar("S", bound=str)
N = TypeVar("N", int, float)


def _type_error(expected: str, value: object) -> ValueError:
    return ValueError(f"expected {expected} (got {typename(value)})")


# Converters for TOML scalars. bool is a subclass of int in Python but never a number in TOML.


def as_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _type_error("a string", value)


def as_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _type_error("an integer", value)


def as_float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _type_error("a number", value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number (got {value})")
    return float(value)


def as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _type_error("a boolean", value)


class Reader:
    """One table of the document at `path`; getters record errors into the shared `errors` list."""

    def __init__(self, data: Mapping[str, Any], path: str, errors: list[str]) -> None:
        self.data = data
        self.keypath = path
        self.errors = errors
        self._seen: set[str] = set()
        self._failed: set[str] = set()

    def at(self, key: str) -> str:
        """The full key path of `key` in this table."""
        return f"{self.keypath}.{key}" if self.keypath else key

    def error(self, key: str, message: str) -> None:
        """Record `message` against `key` (a key of this table, possibly with a suffix like "[2]")."""
        self._failed.add(key)
        self.errors.append(f"{self.at(key)}: {message}")

    def ok(self, key: str) -> bool:
        """No error was recorded against `key`: its value is the real one, not a stand-in default."""
        return key not in self._failed

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, convert: Callable[[Any], T], default: T, *, required: bool = False) -> T:
        """`convert(data[key])`, or `default` when the key is missing or `convert` raises ValueError
        (recorded as an error, as is a missing `required` key)."""
        self._seen.add(key)
        if key not in self.data:
            if required:
                self.error(key, "missing required key")
            return default
        try:
            return convert(self.data[key])
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    def string(self, key: str, default: str = "", *, required: bool = False, nonempty: bool = False) -> str:
        def convert(v: Any) -> str:
            s = as_str(v)
            if nonempty and not s.strip():
                raise ValueError("must not be empty")
            return s

        return self.get(key, convert, default, required=required)

    def boolean(self, key: str, default: bool) -> bool:
        return self.get(key, as_bool, default)

    def integer(self, key: str, default: int, *, minimum: int | None = 0, maximum: int | None = None) -> int:
        return self.get(key, ranged(as_int, minimum, maximum), default)

    def number(
        self, key: str, default: float, *, minimum: float | None = 0.0, maximum: float | None = None
    ) -> float:
        return self.get(key, ranged(as_float, minimum, maximum), default)

    def duration(self, key: str, default: str | float, *, positive: bool = False) -> float:
        """Seconds; `positive` rejects zero (timeouts: a zero timeout would fail every operation)."""
        return self.get(key, ranged(parse_duration, positive=positive), parse_duration(default))

    def size(self, key: str, default: int | str, *, minimum: int = 0) -> int:
        return self.get(key, ranged(parse_size, minimum), parse_size(default))

    def choice(self, key: str, choices: tuple[S, ...], default: S, *, required: bool = False) -> S:
        """One of `choices`, exactly as spelled there."""

        def convert(v: Any) -> S:
            as_str(v)
            for c in choices:
                if v == c:
                    return c
            raise ValueError(f"must be one of {', '.join(choices)} (got {v!r})")

        return self.get(key, convert, default, required=required)

    def path(
        self, key: str, base_dir: Path, default: str | None = None, *, required: bool = False
    ) -> Path | None:
        """A filesystem path; relative ones are taken relative to `base_dir` (the config's directory)."""

        def convert(v: Any) -> Path:
            s = as_str(v)
            if not s.strip():
                raise ValueError("must not be empty")
            return resolve_path(s, base_dir)

        fallback = None if default is None else resolve_path(default, base_dir)
        return self.get(key, convert, fallback, required=required)

    def list_of(
        self,
        key: str,
        item: Callable[[Any], T],
        default: tuple[T, ...] = (),
        *,
        required: bool = False,
        nonempty: bool = False,
    ) -> tuple[T, ...]:
        """An array whose items each go through `item`; bad items are reported as `key[i]` and dropped."""
        self._seen.add(key)
        if key not in self.data:
            if required:
                self.error(key, "missing required key")
            return default
        value = self.data[key]
        if not isinstance(value, list):
            self.error(key, f"expected an array (got {typename(value)})")
            return default
        if nonempty and not value:
            self.error(key, "must not be empty")
            return default
        out: list[T] = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ValueError as exc:
                self.error(f"{key}[{i}]", str(exc))
        return tuple(out)

    def mapping(
        self, key: str, value: Callable[[Any], T], key_convert: Callable[[str], str] = str
    ) -> dict[str, T]:
        """A table of arbitrary keys (each through `key_convert`) whose values each go through `value`."""
        sub = self.table(key)
        out: dict[str, T] = {}
        for k in sub.data:
            sub._seen.add(k)
            try:
                out[key_convert(k)] = value(sub.data[k])
            except ValueError as exc:
                sub.error(_quote_key(k), str(exc))
        return out

    def table(self, key: str) -> Reader:
        """The sub-table `key` (empty when missing or not a table, the latter recorded as an error)."""
        self._seen.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            self.error(key, f"expected a table (got {typename(value)})")
            value = {}
        return Reader(value, self.at(key), self.errors)

    def tables(self, key: str) -> list[Reader] | None:
        """The array of tables `key` (`[[key]]`), or None when the key is absent."""
        self._seen.add(key)
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, list):
            self.error(key, f"expected an array of tables (got {typename(value)})")
            return []
        readers: list[Reader] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                readers.append(Reader(item, f"{self.at(key)}[{i}]", self.errors))
            else:
                self.error(f"{key}[{i}]", f"expected a table (got {typename(item)})")
        return readers

    def done(self, value: T) -> T:
        """`finish()`, then return `value`: the tail of every section reader."""
        self.finish()
        return value

    def finish(self) -> None:
        """Report every key of this table that no getter asked for."""
        for key in self.data:
            if key not in self._seen:
                self.error(_quote_key(key), "unknown key")


def check_unique(top: Reader, section: str, key: str, values: Sequence[str]) -> None:
    """Report `section[i].key` for every value that repeats an earlier one; empty values are skipped
    (they are errors of their own)."""
    first: dict[str, int] = {}
    for i, value in enumerate(values):
        if value and value in first:
            top.error(f"{section}[{i}].{key}", f"duplicate {value!r} (also {section}[{first[value]}])")
        first.setdefault(value, i)


def _quote_key(key: str) -> str:
    """A key as TOML would need it written: bare when possible, quoted otherwise ("gmail.com")."""
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def resolve_path(text: str, base_dir: Path) -> Path:
    """`text` with "~" expanded, made absolute relative to `base_dir`."""
    return Path(os.path.abspath(base_dir / Path(text).expanduser()))


def ranged(
    convert: Callable[[Any], N],
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    positive: bool = False,
) -> Callable[[Any], N]:
    """`convert` followed by a range check."""

    def check(v: Any) -> N:
        value = convert(v)
        if positive and value <= 0:
            raise ValueError(f"must be greater than 0 (got {v!r})")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be at least {minimum:g} (got {v!r})")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum:g} (got {v!r})")
        return value

    return check
