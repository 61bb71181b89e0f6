"""Every variable a user can set, in one table derived from the settings' own declarations.

A setting is declared once, as a field of a config dataclass with its default and a one-line doc
(libs/common/config.py): the shared `CommonConfig` (section `common`, variable `LLMP_<FIELD>`) and
each service's config (section `<service>`, variable `LLMP_<SERVICE>_<FIELD>`), named in SECTIONS.
The few variables that are no config's field (where clients reach each service, what the command
line sends) are declared in OTHERS. `llmp config vars` prints the table.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from libs.common.config import env_name


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    doc: str


SECTIONS: dict[str, str] = {
    "common": "libs.common.config:CommonConfig",
    "gateway": "services.gateway.config:GatewayConfig",
    "tokenizer": "services.tokenizer.config:TokenizerConfig",
    "retrieval": "services.retrieval.config:RetrievalConfig",
    "training": "services.training.config:TrainingConfig",
    "inference": "services.inference.config:InferenceConfig",
}
"""Section -> its config dataclass ("module:Class"); a service whose code is not installed has no variables."""

OTHERS = [
    EnvVar("LLMP_CONFIG", "", "YAML config file: a `common:` section and one section per service"),
    EnvVar("LLMP_API_KEY", "", "API key the `llmp` command line sends (else $LLMP_HOME/secrets/admin.key)"),
    EnvVar("LLMP_GATEWAY_URL", "", "gRPC address `llmp --gateway` sends every command to"),
]


def configs() -> dict[str, type]:
    """Section -> config dataclass, for the sections whose code is installed."""
    found = {}
    for section, ref in SECTIONS.items():
        module, _, name = ref.partition(":")
        if importlib.util.find_spec(module.rpartition(".")[0]) is not None:
            found[section] = getattr(importlib.import_module(module), name)
    return found


def as_text(value: Any) -> str:
    """A default as a variable would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _section_vars(section: str, cls: type) -> list[EnvVar]:
    defaults = cls()
    found = [
        EnvVar(env_name(section, f.name), as_text(getattr(defaults, f.name)), f.metadata.get("doc", ""))
        for f in dataclasses.fields(cls)
    ]
    if section != "common":
        where = f"where clients reach the {section} service"
        found.append(EnvVar(env_name(section, "address"), f"127.0.0.1:{defaults.port}", where))
    return found


VARIABLES: dict[str, EnvVar] = {
    v.name: v for v in [*(v for s, c in configs().items() for v in _section_vars(s, c)), *OTHERS]
}


def env(name: str) -> str:
    """The value of a declared variable (its default when unset)."""
    var = VARIABLES[name]
    return os.environ.get(name, var.default)


def llmp_home() -> str:
    return os.path.expanduser(env("LLMP_HOME"))
