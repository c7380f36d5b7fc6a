"""Typed configuration: pydantic models loaded from YAML, unknown keys rejected,
dotted overrides (``a.b.c=value``) from the command line.

Errors name the dotted path of the bad key and what is allowed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cbd_ray.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def config_hash(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (keys sorted): what identifies a
    config, a stage's inputs or a set of checksums."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=3"`` -> (["a", "b", "c"], 3). The value is parsed as YAML (numbers, bools,
    lists, null); a plain word stays a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply dotted overrides to a nested dict (lists are indexed by integer parts, within
    the list: an override never grows a list or descends into a number or a string)."""
    for item in overrides or []:
        path, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_index(part, path, i, len(node))]
                continue
            _check_mapping(node, path, i)
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            node[_index(last, path, len(path) - 1, len(node))] = value
        else:
            _check_mapping(node, path, len(path) - 1)
            node[last] = value
    return data


def _check_mapping(node: Any, path: list[str], i: int) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"override key {'.'.join(path)}: {'.'.join(path[:i])} is a {type(node).__name__} "
                          f"({node!r}), not a mapping; {path[i]!r} cannot be set inside it")


def _index(part: str, path: list[str], i: int, length: int) -> int:
    try:
        k = int(part)
    except ValueError:
        raise ConfigError(
            f"override key {'.'.join(path)}: {'.'.join(path[:i])} is a list; "
            f"{part!r} must be an integer index"
        ) from None
    if not -length <= k < length:
        raise ConfigError(f"override key {'.'.join(path)}: index {k} is past the end of {'.'.join(path[:i])} "
                          f"(a list of {length}); allowed: 0..{length - 1}")
    return k


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] in ("literal_error", "enum"):
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def build(model: type[M], data: dict, source: str = "config") -> M:
    """Validate ``data`` into ``model``; a ConfigError listing each bad key's path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so a typo'd second `steps:` would win unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"{self.name}:{line}: key {key!r} repeats line {seen[key]}; "
                                  "give each key once")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str, name: str = "<string>") -> Any:
    """``yaml.safe_load`` that refuses duplicate keys; errors name ``name:line``."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``: one-line ConfigError for a missing file, invalid UTF-8 or
    YAML (file:line), a repeated key, or a top level that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = safe_load_unique(text, str(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def load(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Load a YAML file into ``model`` after applying dotted overrides."""
    data = apply_overrides(load_yaml(path), overrides)
    return build(model, data, source=str(path))
