"""Typed config objects from TOML tables.

Each config section is a dataclass whose fields carry their types and defaults. `build` turns a
parsed TOML table into that dataclass and reports every problem as a `ConfigError` naming the
file and the dotted key: unknown keys (with the nearest valid name), wrong types, missing
required keys and values out of range. A `Path` field is resolved against the folder of the file
that sets it; a field whose loaded form takes the key's name is declared under another (`keyed`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from utils.errors import ConfigError
from utils.secrets import redacted


def required(toml_key: str | None = None):
    """Field marker for a key that has no default (`toml_key`: as for `keyed`)."""
    return keyed(toml_key) if toml_key else dataclasses.field(default=dataclasses.MISSING)


def keyed(toml_key: str, **field_kwargs):
    """A field read from TOML key `toml_key` under another name: for a value that loading turns
    into an object which takes the key's name (the `dataset` key is `dataset_file`, a path; the
    loaded dataset is `TrainConfig.dataset`), so that each name has one meaning."""
    return dataclasses.field(metadata={"toml_key": toml_key}, **field_kwargs)


def toml_key(f: dataclasses.Field) -> str:
    """The TOML key field `f` is read from."""
    return f.metadata.get("toml_key", f.name)


def toml_fields(cls) -> dict[str, dataclasses.Field]:
    """The fields of dataclass `cls` that TOML sets, by TOML key."""
    return {toml_key(f): f for f in dataclasses.fields(cls) if f.init}


# A Path field is a string in TOML, resolved against the folder of the file that sets it.
_NAMES = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
          str: ("a string", "strings"), Path: ("a string", "strings"), bool: ("true or false", "true/false values"),
          dict: ("a table", "tables")}


def described(tp, description: str):
    """`tp`, named in error messages by `description` (e.g. "a size like 512 or [1280, 720]")
    instead of its spelled-out type."""
    return Annotated[tp, description]


def _type_name(tp, plural: bool = False) -> str:
    """How an error message names type `tp`: "a list of integers", "a string or a list of strings"."""
    origin = get_origin(tp)
    if origin is Annotated:
        return tp.__metadata__[0]
    if tp is type(None):
        return "nothing"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        # Lists first, whatever order the Union was written in: typing caches equal Unions, so the
        # order of get_args depends on which module spelt the Union first.
        options = sorted((a for a in get_args(tp) if a is not type(None)),
                         key=lambda a: get_origin(a) not in (list, tuple))
        return " or ".join(_type_name(a, plural) for a in options)
    if origin in (list, tuple):
        args = get_args(tp)
        lists = "lists" if plural else "a list"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"{lists} of {len(args)} {_type_name(args[0], plural=True)}"
            return f"{lists} of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"{lists} of {_type_name(args[0], plural=True)}" if args else lists
    if dataclasses.is_dataclass(tp):
        return "tables" if plural else "a table"
    names = _NAMES.get(tp)
    if names:
        return names[plural]
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp, where: str, file: Path, top_level: frozenset = frozenset()):
    """Convert a TOML value to `tp`, raising ConfigError (nested tables) or _Mismatch (type).
    `top_level`: the keys of the file's top level, for the hint on a key written under the wrong table."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        return _convert(value, get_args(tp)[0], where, file, top_level)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            if option is type(None):
                continue
            try:
                return _convert(value, option, where, file, top_level)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert_item(v, item_tp, f"{where}[{i}]", file, top_level) for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            raise _Mismatch
        if args and args[-1] is Ellipsis:
            return tuple(_convert_item(v, args[0], f"{where}[{i}]", file, top_level) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert_item(v, a, f"{where}[{i}]", file, top_level) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return build(tp, value, file, where, top_level)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        # nan and inf are valid TOML, but no setting here means anything with them.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Path:
        if isinstance(value, str):
            return resolve_path(file.parent, value, file, where)
        raise _Mismatch
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r} for {where}")


def _convert_item(value, tp, where, file, top_level=frozenset()):
    try:
        return _convert(value, tp, where, file, top_level)
    except _Mismatch:
        # A token pasted into the wrong key must not end up in a log.
        raise ConfigError(f"{file}: '{where}' must be {_type_name(tp)}, got {redacted(repr(value))}") from None


def _table_types(tp) -> tuple[type | None, bool]:
    """The dataclass a field of type `tp` holds as a table (or None), and whether it is a list of them."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            found = _table_types(option)
            if found[0] is not None:
                return found
    if origin is list and get_args(tp) and dataclasses.is_dataclass(get_args(tp)[0]):
        return get_args(tp)[0], True
    return None, False


def unknown_keys(cls, table: dict, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Every key of `table` and of its nested tables that `cls` does not have, as (dotted key,
    the valid names beside it), so that all of them can be reported at once."""
    hints = typing.get_type_hints(cls)
    by_key = toml_fields(cls)
    fields = sorted(by_key)
    found = []
    for key, value in table.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in by_key:
            found.append((where, fields))
            continue
        inner, is_list = _table_types(hints[by_key[key].name])
        if inner is None:
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    found += unknown_keys(inner, item, f"{where}[{i}]")
        elif isinstance(value, dict):
            found += unknown_keys(inner, value, where)
    return found


def near_name_hint(key: str, valid: list[str]) -> str:
    """' (did you mean ...?)' for the nearest valid name, or the list of valid names."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else f"; valid keys here: {', '.join(sorted(valid))}"


def build(cls, table: dict, file: Path | str, prefix: str = "", top_level: frozenset = frozenset()):
    """Build dataclass `cls` from a TOML table, validating keys and types.

    Dataclasses may define `validate(self, file, prefix)` for range checks; it runs after the
    fields are converted. `top_level`: the file's top-level keys, when `cls` is a table inside
    it (they default to `cls`'s own keys at the top level).
    """
    file = Path(file)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = toml_fields(cls)
    if not prefix:
        top_level = frozenset(fields)
    kwargs = {}
    for key, value in table.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            if prefix and key in top_level:
                raise ConfigError(f"{file}: unknown key '{where}': {table_rule(prefix, key)}")
            raise ConfigError(f"{file}: unknown key '{where}'{near_name_hint(key, list(fields))}")
        kwargs[fields[key].name] = _convert_item(value, hints[fields[key].name], where, file, top_level)
    for key, f in fields.items():
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{file}: missing required key '{where}' ({_type_name(hints[f.name])})")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(file, prefix)
    return obj


def table_rule(prefix: str, name: str) -> str:
    """Why a top-level key landed in table `prefix`: in TOML, every key after a table header
    belongs to that table, up to the next header."""
    table = prefix.split(".")[0]
    header = f"[[{table.split('[')[0]}]]" if table.endswith("]") else f"[{table}]"
    return (f"'{name}' is a top-level key, but TOML puts every key written after the {header} header into that "
            f"table; move '{name}' above the first [table] header of the file")


def path_is(path: Path, kind: str) -> bool:
    """Whether `path` is a file / dir / exists; False for names the OS rejects (too long, ...)."""
    try:
        return {"file": path.is_file, "dir": path.is_dir, "exists": path.exists}[kind]()
    except (OSError, ValueError):
        return False


def resolve_path(base: Path, value: str, file: Path | None = None, where: str = "") -> Path:
    """`value` as an absolute path, relative to `base`; a ConfigError naming `file` and key
    `where` for a value that is no usable path (a NUL byte, a symlink loop, ~unknown_user)."""
    try:
        if "\0" in value:
            raise ValueError("embedded null byte")
        p = Path(value).expanduser()
        return (p if p.is_absolute() else (base / p)).resolve()
    except RuntimeError as e:  # symlink loops and unknown users' home folders
        reason = str(e)
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
    raise ConfigError(f"{file or base}: '{where or 'path'}' is not a usable path ({reason}): {value!r}")


def check(condition: bool, file: Path, where: str, message: str) -> None:
    """Raise a ConfigError for key `where` of `file` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{file}: '{where}' {message}")


def positive(obj, file: Path, names: list[str], prefix: str = "") -> None:
    """Raise a ConfigError for the first of fields `names` of `obj` that is set and below 1."""
    for name in names:
        value = getattr(obj, name)
        check(value is None or value >= 1, file, key(prefix, name), f"must be at least 1, got {value}")


def check_regex(pattern: str, file: Path, where: str) -> None:
    """Raise a ConfigError for key `where` unless `pattern` compiles as a regular expression."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ConfigError(f"{file}: '{where}' is not a valid regular expression ({e}): {pattern!r}") from None


def key(prefix: str, name: str) -> str:
    """Dotted key name inside a section."""
    return f"{prefix}.{name}" if prefix else name
