"""Build hook: generate the gRPC stubs from proto/ whenever the package is built or installed.

The stubs land next to their .proto files (proto/llmp/<svc>/v1/*_pb2.py), so the proto tree is
also the import path (`llmp.<svc>.v1`). They are never committed.
"""

from __future__ import annotations

import pathlib
import sys

from setuptools import find_namespace_packages, find_packages, setup

ROOT = pathlib.Path(__file__).parent
sys.path.insert(0, str(ROOT / "libs" / "common"))

from protogen import generate  # noqa: E402

generate(ROOT / "proto")

setup(
    packages=[
        *find_packages(include=["libs*", "services*"]),
        *find_namespace_packages(where="proto", include=["llmp*"]),
    ],
    package_dir={"llmp": "proto/llmp"},
)
