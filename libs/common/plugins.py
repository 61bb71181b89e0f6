"""Plugin registries: one per algorithm kind, resolving a name to a class.

Built-ins come from an explicit `name -> "module:attr"` table; third parties add plugins by
installing a package that declares an entry point in the kind's group (e.g. `llmp.tokenizers`).
LLMP_PLUGINS_ALLOW restricts which third-party plugins load (`kind:name` or `name`). A broken
third-party plugin is logged and reported as unavailable; it never takes the registry down and
never shadows a built-in. A spec is data: `{"type": "<name>", **params}`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

from libs.common.errors import InvalidArgument
from libs.common.settings import env

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUPS = (
    "llmp.tokenizers",
    "llmp.embedders",
    "llmp.chunkers",
    "llmp.vectorstores",
    "llmp.objectives",
    "llmp.samplers",
    "llmp.quantizers",
    "llmp.drafters",
    "llmp.engines",
)


def import_object(ref: str) -> Any:
    """Import "package.module:attr.sub"."""
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def allow_list() -> set[str] | None:
    raw = env("LLMP_PLUGINS_ALLOW").strip()
    return {s.strip() for s in raw.split(",") if s.strip()} if raw else None


class Registry(Generic[T]):
    """Name -> plugin class for one kind of algorithm."""

    def __init__(self, kind: str, builtins: Mapping[str, str], base: type | None = None) -> None:
        self.kind = kind
        self.group = f"llmp.{kind}"
        self.builtins = dict(builtins)
        self.base = base
        self._loaded: dict[str, type[T]] = {}
        self._broken: dict[str, str] = {}
        self._lock = threading.Lock()

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        allowed = allow_list()
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for ep in importlib.metadata.entry_points(group=self.group):
            if ep.name in self.builtins:
                log.warning("plugin %s:%s from %s would shadow a built-in; ignored", self.kind, ep.name, ep.value)
                continue
            if allowed is not None and ep.name not in allowed and f"{self.kind}:{ep.name}" not in allowed:
                log.info("plugin %s:%s is not in LLMP_PLUGINS_ALLOW; ignored", self.kind, ep.name)
                continue
            found[ep.name] = ep
        return found

    def names(self) -> list[str]:
        """Every name that can be asked for: built-ins and allowed third-party plugins."""
        return sorted(set(self.builtins) | set(self._entry_points()))

    def get(self, name: str, *, field: str = "type") -> type[T]:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if name in self.builtins:
                cls = import_object(self.builtins[name])
                source = "built-in"
            else:
                ep = self._entry_points().get(name)
                if ep is None:
                    raise InvalidArgument(
                        f"unknown {self.kind} plugin {name!r}; available: {', '.join(self.names())}", field=field
                    )
                try:
                    cls = ep.load()
                except Exception as e:  # a third party's import error must not break the service
                    self._broken[name] = repr(e)
                    log.exception("plugin %s:%s failed to load", self.kind, name)
                    raise InvalidArgument(f"{self.kind} plugin {name!r} failed to load: {e}", field=field) from None
                source = ep.value
            if self.base is not None and not (inspect.isclass(cls) and issubclass(cls, self.base)):
                raise InvalidArgument(f"{self.kind} plugin {name!r} is not a {self.base.__name__}", field=field)
            self._loaded[name] = cls
            log.info("loaded %s plugin %r from %s", self.kind, name, source)
            return cls

    def create(self, spec: Mapping[str, Any] | str, *, field: str = "spec", **context: Any) -> T:
        """Instantiate from `{"type": name, **params}` (or a bare name); bad params name the field."""
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str) or not spec["type"]:
            raise InvalidArgument('a plugin spec is {"type": "<name>", ...params}', field=field)
        params = {k: v for k, v in spec.items() if k != "type"}
        cls = self.get(spec["type"], field=f"{field}.type")
        accepted = parameters(cls)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [k for k in params if k not in accepted and not takes_any]
        if unknown:
            known = ", ".join(k for k in accepted if k not in context) or "nothing"
            raise InvalidArgument(
                f"{spec['type']} does not take {', '.join(map(repr, unknown))}; it takes {known}",
                field=field,
            )
        try:
            return cls(**params, **context)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"{spec['type']}: {e}", field=field) from None

    def broken(self) -> dict[str, str]:
        return dict(self._broken)


_PARAMETERS: dict[Any, Mapping[str, inspect.Parameter]] = {}


def parameters(cls: Any) -> Mapping[str, inspect.Parameter]:
    """What a plugin class takes, by name (inspect.signature costs ~150 us on a builtin-derived class:
    once a class, not once a request)."""
    found = _PARAMETERS.get(cls)
    if found is None:
        found = _PARAMETERS[cls] = inspect.signature(cls).parameters
    return found


def describe_all(registries: Iterable[Registry[Any]]) -> dict[str, list[str]]:
    return {r.kind: r.names() for r in registries}
