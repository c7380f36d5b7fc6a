"""Typed configuration: pydantic models loaded from YAML, unknown keys rejected,
dotted overrides (``a.b.c=value``) from the command line.

Errors name the dotted path of the bad key and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cbd_ray.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


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
    """Apply dotted overrides to a nested dict (lists are indexed by integer parts)."""
    for item in overrides or []:
        path, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_index(part, path, i)]
                continue
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            node[_index(last, path, len(path) - 1)] = value
        else:
            node[last] = value
    return data


def _index(part: str, path: list[str], i: int) -> int:
    try:
        return int(part)
    except ValueError:
        raise ConfigError(
            f"override key {'.'.join(path)}: {'.'.join(path[:i])} is a list; "
            f"{part!r} must be an integer index"
        ) from None


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


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def load(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Load a YAML file into ``model`` after applying dotted overrides."""
    data = apply_overrides(load_yaml(path), overrides)
    return build(model, data, source=str(path))
