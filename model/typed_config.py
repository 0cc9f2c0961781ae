"""Strict conversion between YAML mappings and typed, frozen config dataclasses.

The dataclass *is* the schema: a YAML key that is not a field is an error, a value of the wrong
type is an error, and every error names the dotted key path and the file it came from. This is
the open_clip ``CLIPVisionCfg(**d)`` idea, extended to nested configs and to helpful messages.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

import yaml

T = TypeVar("T")

ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """A config file or mapping does not match its schema. The message names the key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the last
    one, so a second ``search_space:`` block would silently drop the first's parameters."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error says so, with its line
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (safe_load, duplicate keys refused); a missing or malformed file names itself."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def expand_env(value: str, where: str) -> str:
    """Replace ``${NAME}`` references with environment variables, so secrets stay out of YAML."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{where}: environment variable ${{{name}}} is not set")
        return os.environ[name]

    return ENV_REFERENCE.sub(repl, value)


def from_dict(cls: type[T], data: Any, *, where: str = "", base_dir: Path | None = None) -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    Relative ``Path`` fields are resolved against ``base_dir`` (the YAML file's folder), so a
    config means the same thing whatever the working directory. ``${ENV}`` references in string
    and path values are expanded.
    """
    return _convert(cls, data, where, base_dir)


def convert(tp: Any, value: Any, where: str) -> Any:
    """One value in type ``tp`` (a field's type hint), strictly, as :func:`from_dict` converts fields."""
    return _convert(tp, value, where, None)


def to_dict(obj: Any, *, relative_to: Path | None = None) -> Any:
    """The inverse of :func:`from_dict`: plain YAML-able data; paths relative to ``relative_to``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name), relative_to=relative_to) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        if relative_to is not None and obj.is_absolute():
            return os.path.relpath(obj, relative_to)
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v, relative_to=relative_to) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, relative_to=relative_to) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str, base_dir: Path | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where, base_dir)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors, literal_errors = [], []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, base_dir)
            except ConfigError as err:
                (literal_errors if typing.get_origin(arg) is Literal else errors).append(str(err))
        # A value that is none of a Literal's few words was meant as the other type: its error
        # says more ("environment variable ${X} is not set" rather than "not one of 'random'").
        errors = errors or literal_errors
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, str):  # ("${WEIGHTS}" set to "random" is "random")
            value = expand_env(value, where)
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {
            _convert(key_tp, k, f"{where}", base_dir): _convert(val_tp, v, f"{where}.{k}", base_dir)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads "1e-4" (no dot) as a string; accept numeric strings, since users write that.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf / .nan: no setting of ours means them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return expand_env(value, where)
    if tp is Path:
        text = expand_env(str(value), where) if isinstance(value, (str, Path)) else ""
        if not text.strip():  # ("" would be the YAML's folder)
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        path = Path(text).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = (base_dir / path).resolve()
        return path
    raise TypeError(f"{where}: unsupported config type {tp!r}")  # a schema bug, not a user error


def _convert_dataclass(cls: Any, value: Any, where: str, base_dir: Path | None) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or 'top level'}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], key, base_dir)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # __post_init__ checks raise ValueError naming the field
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None  # a top-level check names its key
