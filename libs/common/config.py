"""Configuration as small dataclasses, layered: defaults < YAML file < LLMP_* variables < flags.

A service config subclasses `ServiceConfig` and adds its own fields, each with a default and a
docstring-like `doc` in its metadata: these fields are the one declaration of every setting, and
settings.py derives the table of variables from them. The YAML file (`--config` or LLMP_CONFIG) has
a `common:` section and one section per service; a field `f` of section `s` is the variable
`LLMP_S_F` (`LLMP_F` for `common`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from libs.common.errors import InvalidArgument

C = TypeVar("C")


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a one-line description (shown by `llmp config show`)."""
    return dataclasses.field(default=default, metadata={"doc": text}, **kwargs)


@dataclasses.dataclass
class CommonConfig:
    home: str = doc("local state, logs and the artifact store", "~/.llmp")
    log_level: str = doc("DEBUG, INFO, WARNING or ERROR", "INFO")
    log_format: str = doc("json or text", "json")
    redis_url: str = doc("Redis server; empty: the local one started by `llmp up`", "")
    redis_port: int = doc("port of the local Redis started by `llmp up`", 6379)
    ray_port: int = doc("GCS port of the Ray head `llmp up` starts", 6380)
    ray_dashboard_port: int = doc("Ray dashboard port, on 127.0.0.1", 8265)
    qdrant_url: str = doc("Qdrant server; empty: embedded", "")
    plugins_allow: list[str] = doc("third-party plugins allowed; empty: all", default_factory=list)

    @property
    def home_path(self) -> Path:
        return Path(os.path.expanduser(self.home))

    @property
    def artifacts_path(self) -> Path:
        return self.home_path / "artifacts"


@dataclasses.dataclass
class ServiceConfig:
    """Fields every gRPC service has; a service's config subclasses this."""

    host: str = doc("interface to bind", "127.0.0.1")
    port: int = doc("gRPC port", 0)
    metrics_port: int = doc("Prometheus port; -1 turns metrics off", -1)
    max_message_bytes: int = doc("largest gRPC message sent or accepted", 64 << 20)
    max_concurrent_rpcs: int = doc("calls served at once; more are refused", 256)
    max_slow_calls: int = doc("slow calls (watches, reports, imports) served at once, in threads of their own", 32)
    drain_seconds: float = doc("grace period for in-flight work on SIGTERM", 30.0)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        (item,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [s for s in str(value).split(",") if s.strip()]
        return [_coerce(v.strip() if isinstance(v, str) else v, item, name) for v in items]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            return tp(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"cannot read {value!r} as {tp.__name__}", field=name) from None
    return value


def env_name(section: str, field: str) -> str:
    prefix = "LLMP_" if section == "common" else f"LLMP_{section.upper()}_"
    return prefix + field.upper()


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InvalidArgument(f"cannot read config file {path}: {e}", field="config") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path} must hold a mapping of sections", field="config")
    return data


def load(
    cls: type[C],
    section: str,
    *,
    file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> C:
    """Build `cls` from its defaults, then the file's `section`, then LLMP_* variables, then flags."""
    environ = os.environ if environ is None else environ
    file = file or environ.get("LLMP_CONFIG") or None
    layers: list[Mapping[str, Any]] = []
    if file:
        from_file = read_yaml(file).get(section) or {}
        if not isinstance(from_file, dict):
            raise InvalidArgument(f"section {section!r} must be a mapping", field="config")
        layers.append(from_file)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    layers.append({n: environ[env_name(section, n)] for n in fields if env_name(section, n) in environ})
    layers.append({k: v for k, v in (flags or {}).items() if v is not None})

    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in fields:
                raise InvalidArgument(f"unknown setting {key!r} in section {section!r}", field=key)
            values[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**values)


def describe(config: Any) -> list[tuple[str, Any, str]]:
    """(field, value, doc) rows for display."""
    return [(f.name, getattr(config, f.name), f.metadata.get("doc", "")) for f in dataclasses.fields(config)]
