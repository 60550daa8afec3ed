"""The one config loader: a YAML file, `dotted.key=value` overrides, a strict pydantic schema.

The trainer's experiment config, the comparison's and the search's all load through `load_yaml`. Every error a
user can make is raised as `ConfigError` with one line that names the file and the key (or row); the CLI turns
it into exit code 2 before any process starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A user error in a config or its inputs; the message is one line naming the culprit."""


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Schema = TypeVar("Schema", bound=BaseModel)

# a validator that has already written the whole line (key included) raises a PydanticCustomError of this type
WHOLE_MESSAGE = "mtp_config"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c=value` in a nested dict; list items are addressed by index or by their `name`."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            idx = _list_index(node, key, dotted)
            if last:
                node[idx] = value
                return
            node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[key] = value
            return
        node = node.setdefault(key, {})


def _list_index(items: list[Any], key: str, dotted: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for idx, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return idx
    raise ConfigError(f"override {dotted}: no list item {key!r}")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Turn `key.sub=value` strings into (key, YAML-typed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def describe_error(error: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as `key: message (got value)`, the key under `prefix`."""
    if error["type"] == WHOLE_MESSAGE:
        return error["msg"]
    loc = ".".join([prefix] * bool(prefix) + [str(part) for part in error["loc"]])
    if error["type"] == "value_error":  # a model validator's own line, which names its keys
        return error["msg"].removeprefix("Value error, ")
    msg = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
    got = error.get("input")
    detail = f" (got {got!r})" if error["type"] not in ("extra_forbidden", "missing") and got is not None else ""
    return f"{loc}: {msg}{detail}" if loc else f"{msg}{detail}"


def format_validation_error(err: ValidationError, source: str) -> str:
    """The first error of a validation as one line, prefixed by the file it came from."""
    return f"{source}: {describe_error(err.errors()[0])}"


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return tree


def load_yaml(path: str | os.PathLike[str], schema: type[Schema], overrides: list[str] | None = None) -> Schema:
    """Read a YAML config, apply `dotted.key=value` overrides, validate it against `schema`."""
    tree = read_yaml(path)
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None


def resolve_path(path: str, what: str) -> Path:
    """Find a file named in a config: as given, else relative to the project root."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate.resolve()
    if not candidate.is_absolute() and (PROJECT_ROOT / candidate).exists():
        return (PROJECT_ROOT / candidate).resolve()
    raise ConfigError(f"{what}: file not found: {path}")
