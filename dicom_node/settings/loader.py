"""Reading the configuration: defaults < the TOML file < ``DICOM_NODE__SECTION__KEY`` overrides.

Every problem becomes one `ConfigError` line naming the file or variable and the
dotted key; the schema's module docstring records the rules.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicom_node.settings.schema import ENV_CONFIG_PATH, ENV_PREFIX, ConfigError, Settings


def load_settings(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the TOML file and environment overrides.

    ``env`` defaults to ``os.environ``; tests pass their own mapping.
    Raises :class:`ConfigError` (never a pydantic or TOML exception).
    """
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG_PATH):
        path = Path(env[ENV_CONFIG_PATH])
    source = str(path) if path is not None else "built-in defaults"
    data = _read_toml(path) if path is not None else {}
    overridden = _apply_env_overrides(data, env, source)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data, source, overridden)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _parse_env_value(raw: str) -> Any:
    """Quoted strings, arrays and inline tables are TOML; anything else stays text
    for pydantic to convert to the field's own type."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    return value if isinstance(value, (str, list, dict)) else raw


def _apply_env_overrides(data: dict[str, Any], env: Mapping[str, str], source: str) -> dict[tuple[str | int, ...], str]:
    """Apply ``DICOM_NODE__A__B=value`` to ``data`` in place; returns which keys
    came from which variable so errors can name the variable."""
    overridden: dict[tuple[str | int, ...], str] = {}
    for var in sorted(env):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        raw_parts = var[len(ENV_PREFIX) :].split("__")
        # Names are case-insensitive, except DICOM keywords under a rule's "match".
        parts = [
            part if i and raw_parts[i - 1].lower() == "match" else part.lower() for i, part in enumerate(raw_parts)
        ]
        if not all(parts):
            raise ConfigError(f"environment {var}: empty key level in the variable name")
        node: Any = data
        loc: list[str | int] = []
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, dict) and part not in node and parts[depth + 1].isdigit():
                raise ConfigError(
                    f"environment {var}: {_format_loc((*loc, part))} has no entry {parts[depth + 1]} in {source}"
                )
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"environment {var}: {_format_loc(tuple(loc))} has no entry {part}"
                        f" in {source} (it has {len(node)})"
                    )
                loc.append(int(part))
                node = node[int(part)]
            else:
                loc.append(part)
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"environment {var}: {_format_loc(tuple(loc))} is not a section")
        if not isinstance(node, dict):
            raise ConfigError(
                f"environment {var}: {_format_loc(tuple(loc))} is a list; set a key of one entry, e.g. {var}__0__NAME"
            )
        key = parts[-1]
        if env[var] == "":
            node.pop(key, None)
        else:
            node[key] = _parse_env_value(env[var])
        overridden[(*loc, key)] = var
    return overridden


def _format_loc(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def _describe(
    exc: ValidationError,
    data: dict[str, Any],
    source: str,
    overridden: dict[tuple[str | int, ...], str],
) -> str:
    """One line: source, then each problem as ``key: message (got value)``."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(p for p in error["loc"] if isinstance(p, (str, int)))
        key = _format_loc(loc)
        named = _entry_name(data, loc)
        if named:  # rules[0] ('brain-mr').match: the entry's name right after its index
            head = _format_loc(loc[:2])
            key = f"{head} ({named}){key[len(head) :]}"
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            value = error.get("input")
            scalar = isinstance(value, (str, int, float, bool))
            secret = bool(loc) and loc[-1] == "database_url"  # may hold a password
            if scalar and len(repr(value)) <= 80 and repr(value) not in message and not secret:
                message += f" (got {value!r})"
        origin = next((var for k, var in overridden.items() if loc[: len(k)] == k), None)
        if origin:
            message += f" [set by environment {origin}]"
        problems.append(f"{key}: {message}" if loc else message)
    return f"{source}: " + "; ".join(problems)


def _entry_name(data: dict[str, Any], loc: tuple[str | int, ...]) -> str | None:
    """The ``name`` of a [[rules]]/[[destinations]] entry an error points into."""
    if len(loc) >= 2 and loc[0] in ("rules", "destinations") and isinstance(loc[1], int):
        entries = data.get(loc[0])
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            return repr(entry["name"])
    return None
