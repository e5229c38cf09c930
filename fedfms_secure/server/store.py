"""The coordinator's folder: ciphertext blobs on disk, metrics and round records as JSON lines.

Layout under ``--state DIR``::

    address.json                  the HOST:PORT the server is bound to (written once listening)
    global/round_<r>/<i>.ct       E(theta_r - theta_0), chunk i (absent for round 0: theta_0 is public)
    global/round_<r>/meta.json    {"vector_length", "chunks"}
    uploads/round_<r>/<site>/<i>.ct   each site's received update chunks, as they arrived
    metrics.jsonl                 public metrics the sites chose to report, one record a line
    rounds.jsonl                  one record per closed round: participants, seconds, bytes
    status.json                   the latest status snapshot

Every file is written to a temporary name and renamed, so a crash never leaves a half-written one
under its final name. Nothing here can decrypt anything: the server holds no CKKS secret key.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from fedfms_secure.errors import ConfigError


class StateStore:
    """Files of one coordinator."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the server state folder {self.root}: {exc}") from exc

    # --- global state -------------------------------------------------------------------------
    def write_global(self, round_: int, chunks: list[bytes], vector_length: int) -> None:
        folder = self.root / "global" / f"round_{round_}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, payload in enumerate(chunks):
            (tmp / f"{i}.ct").write_bytes(payload)
        _write_json(tmp / "meta.json", {"vector_length": vector_length, "chunks": len(chunks)})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    def global_meta(self, round_: int) -> dict[str, int] | None:
        meta = self.root / "global" / f"round_{round_}" / "meta.json"
        return json.loads(meta.read_text()) if meta.exists() else None

    def read_global_chunk(self, round_: int, index: int) -> bytes:
        return (self.root / "global" / f"round_{round_}" / f"{index}.ct").read_bytes()

    # --- uploads ------------------------------------------------------------------------------
    def upload_dir(self, round_: int, site: str) -> Path:
        return self.root / "uploads" / f"round_{round_}" / site

    def start_upload(self, round_: int, site: str) -> Path:
        """A fresh staging folder of its own for one upload stream."""
        parent = self.root / "uploads" / f"round_{round_}"
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{site}.", suffix=".partial", dir=parent))

    def stage_chunk(self, staging: Path, index: int, payload: bytes) -> None:
        _write_bytes(staging / f"{index}.ct", payload)

    def finish_upload(self, staging: Path, round_: int, site: str, receipt: dict[str, Any]) -> None:
        _write_json(staging / "receipt.json", receipt)
        final = self.upload_dir(round_, site)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)

    def discard_upload(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def iter_chunks(folder: Path, total: int) -> Iterator[bytes]:
        for i in range(total):
            yield (folder / f"{i}.ct").read_bytes()

    def latest_global_round(self) -> int:
        """The highest round whose global state is complete on disk (0 when none is)."""
        rounds = [
            int(p.parent.name.removeprefix("round_"))
            for p in (self.root / "global").glob("round_*/meta.json")
            if p.parent.name.removeprefix("round_").isdigit()
        ]
        return max(rounds, default=0)

    # --- records ------------------------------------------------------------------------------
    def append_record(self, name: str, record: dict[str, Any]) -> None:
        with open(self.root / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_records(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        _write_json(self.root / name, data)

    def read_json(self, name: str, default: dict[str, Any]) -> dict[str, Any]:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else default


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
