"""What every service's `main()` shares: reading its config from file, env and flags, and logging.

    common, config = service.configure("tokenizer", TokenizerConfig, argv)

Flags: --config FILE, --host, --port, --metrics-port, and --set key=value for any other field.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from libs.common import config as cfg
from libs.common import logs
from libs.common.config import CommonConfig, ServiceConfig

C = TypeVar("C", bound=ServiceConfig)


@dataclass(frozen=True)
class ServiceSpec:
    """How the local stack starts a service: `python -m <module>` on LLMP_<NAME>_PORT."""

    name: str
    module: str
    default_port: int
    needs_ray: bool = False
    """The local stack starts a Ray head first and hands its address over in RAY_ADDRESS."""


def configure(name: str, config_cls: type[C], argv: Sequence[str] | None = None) -> tuple[CommonConfig, C]:
    parser = argparse.ArgumentParser(prog=f"llmp-{name}", description=f"the llmp {name} service")
    parser.add_argument("--config", help="YAML config file (default: $LLMP_CONFIG)")
    parser.add_argument("--host", help="interface to bind")
    parser.add_argument("--port", type=int, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (-1: off)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting")
    args = parser.parse_args(argv)
    flags: dict[str, Any] = {"host": args.host, "port": args.port, "metrics_port": args.metrics_port}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set needs KEY=VALUE, got {item!r}")
        flags[key.strip()] = value
    common = cfg.load(CommonConfig, "common", file=args.config)
    config = cfg.load(config_cls, name, file=args.config, flags=flags)
    logs.setup(name, common.log_level, common.log_format)
    return common, config


def freeze_heap() -> None:
    """Keep what a process holds once it has started (its imported libraries, a loaded model) out of
    the garbage collector's full collections, which otherwise walk it all: in the inference service's
    front, with Ray, Serve, torch and gRPC imported, one took 370 ms, during which no request moved.
    Objects made later are collected as usual. (Ray Serve does the same in its replicas once they are
    built: RAY_SERVE_FREEZE_GC_ON_STARTUP.)"""
    gc.collect()
    gc.freeze()
