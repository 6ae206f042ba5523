#!/usr/bin/env python3
"""Regenerate shoal/v1/*_pb2*.py from proto/shoal/v1/*.proto (needs grpcio-tools).

Run from anywhere: `python scripts/gen_proto.py`. tests/test_proto.py fails when the
checked-in code no longer matches the .proto files.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
