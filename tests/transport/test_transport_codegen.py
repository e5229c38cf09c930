"""The committed generated code must be exactly what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

from fedfms_secure.transport.codegen import REPO_ROOT, generate


def test_committed_generated_code_matches_proto(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "no generated files"
    for path in fresh:
        committed = REPO_ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make proto` and commit the result"
        assert committed.read_text() == path.read_text(), (
            f"{committed} differs from what proto/ generates: run `make proto` and commit the result"
        )


def test_a_changed_proto_is_detected(tmp_path: Path) -> None:
    src = REPO_ROOT / "proto"
    changed = tmp_path / "proto"
    for p in src.rglob("*.proto"):
        target = changed / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(p.read_text().replace("message GetStatusRequest {}", "message GetStatusRequest { bool verbose = 1; }"))
    out = generate(tmp_path / "out", root=changed)
    pb2 = next(p for p in out if p.name == "federation_pb2.py")
    assert pb2.read_text() != (REPO_ROOT / "fedfms_secure/v1/federation_pb2.py").read_text()
