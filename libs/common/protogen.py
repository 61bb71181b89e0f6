"""Generate Python gRPC stubs from the .proto tree (used by `make proto` and the build hook).

Run: `python -m libs.common.protogen` (writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py beside
each .proto, plus the package __init__ files so `llmp.<svc>.v1` imports as a regular package).
This module imports nothing from the rest of the project so that setup.py can load it alone.
"""

from __future__ import annotations

import pathlib
import sys


def generate(proto_root: pathlib.Path) -> list[pathlib.Path]:
    """Compile every .proto under proto_root; returns the .proto files compiled."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        return []
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={proto_root}",
        f"--pyi_out={proto_root}",
        f"--grpc_python_out={proto_root}",
        *[str(p.relative_to(proto_root)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_root}")
    for proto in protos:
        package_dir = proto.parent
        while package_dir != proto_root:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    return protos


def main() -> None:
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parents[2] / "proto"
    compiled = generate(root)
    print(f"generated stubs for {len(compiled)} proto files under {root}")


if __name__ == "__main__":
    main()
