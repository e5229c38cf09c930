"""Regenerate the committed protobuf / gRPC code from ``proto/`` (``make proto``).

The generated modules live in ``fedfms_secure/v1/`` so that their imports read
``from fedfms_secure.v1 import federation_pb2``. ``tests/transport`` regenerates into a temporary
folder and fails if the committed files differ, so a .proto edit without ``make proto`` is caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedfms_secure.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto sources, relative to ``root``."""
    files = sorted(p.relative_to(root) for p in root.rglob("*.proto"))
    if not files:
        raise ConfigError(f"no .proto files under {root}: run this from a source checkout")
    return files


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from the pinned grpcio-tools) on every .proto file into ``out_dir``."""
    from grpc_tools import protoc  # test extra only: runtime never needs the generator

    out_dir.mkdir(parents=True, exist_ok=True)
    sources = proto_files(root)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise ConfigError(f"protoc failed on {', '.join(map(str, sources))}; see its message above")
    return [out_dir / f"{s.with_suffix('')}{suffix}" for s in sources for suffix in GENERATED_SUFFIXES]


def main() -> int:
    written = generate(REPO_ROOT)
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
