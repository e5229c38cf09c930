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
