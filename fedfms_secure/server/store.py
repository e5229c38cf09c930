"""The coordinator's folder: SQLite (WAL) for the federation's state, content-addressed blobs for
ciphertexts, and JSON files that other tools read.

Layout under ``--state DIR``::

    state.db              rounds and phases, commits, received uploads, global states, retired sites,
                          CKKS key epochs and the sealed envelopes of the current one (opaque bytes)
    blobs/ab/abcdef...    one ciphertext (or plaintext block) each, named by the sha256 of its bytes
    address.json          the HOST:PORT the server is bound to (written once listening)
    status.json           the latest status snapshot (for the demo's progress display)
    metrics.jsonl         what each site reported after a round: contributed, bytes up and down (no scores)
    rounds.jsonl          one record per closed round: participants, seconds, bytes
    revocations.json      every certificate revocation the server has seen and the highest CRL number
                          (written atomically by ``transport/revocation.py``; it outlives the bundle's crl.pem)

A blob is written to a temporary name, flushed and renamed, and its name is checked against its
content on every read, so a half-written or damaged blob is detected and never used. Every state
change is one SQLite transaction. Nothing here can decrypt anything: the server holds no CKKS
secret key, and the envelopes that carry it between sites are sealed to each site's own key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from fedfms_secure.atomic import write_atomic
from fedfms_secure.errors import ConfigError
from fedfms_secure.protocol import KeyEpoch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commits (
    round INTEGER NOT NULL, site TEXT NOT NULL, blob TEXT NOT NULL, PRIMARY KEY (round, site));
CREATE TABLE IF NOT EXISTS uploads (
    round INTEGER NOT NULL, site TEXT NOT NULL, chunks INTEGER NOT NULL, bytes INTEGER NOT NULL,
    digest TEXT NOT NULL, vector_length INTEGER NOT NULL, blobs TEXT NOT NULL, PRIMARY KEY (round, site));
CREATE TABLE IF NOT EXISTS globals (
    round INTEGER PRIMARY KEY, vector_length INTEGER NOT NULL, blobs TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retired (site TEXT PRIMARY KEY, round INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS key_epochs (
    epoch INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (
    epoch INTEGER NOT NULL, site TEXT NOT NULL, envelope BLOB NOT NULL, PRIMARY KEY (epoch, site));
"""


class BlobError(Exception):
    """A blob is missing, or its content does not match its name (half-written or damaged)."""


@dataclass(frozen=True)
class UploadRow:
    site: str
    chunks: int
    bytes: int
    digest: str
    vector_length: int
    blobs: tuple[str, ...]


@dataclass(frozen=True)
class GlobalRow:
    round: int
    vector_length: int
    blobs: tuple[str, ...]


class StateStore:
    """Files and database of one coordinator. Not thread-safe: the coordinator serialises access."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / "state.db", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the server state folder {self.root}: {exc}; check the path "
                              "and its permissions, or give another --state") from exc

    def discard_partial_blobs(self) -> int:
        """Deletes blob files a crash left half-written (never referenced); the owning server calls
        this once at start-up, before any write, and no other reader of the folder may."""
        partial = list((self.root / "blobs").glob("*/*.tmp"))
        for tmp in partial:
            tmp.unlink(missing_ok=True)
        return len(partial)

    def close(self) -> None:
        self._db.close()

    # --- blobs --------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        return self.stage_blob(data)[0]

    def stage_blob(self, data: bytes) -> tuple[str, bool]:
        """Stores ``data``; returns its name and whether this call wrote it (False: it was there)."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if path.exists():
            return digest, False
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, data, mode=0o600)
        return digest, True

    def delete_blobs(self, digests: Iterable[str]) -> None:
        """Deletes the named blobs (those of a refused upload: nothing references them)."""
        for digest in digests:
            self._blob_path(digest).unlink(missing_ok=True)

    def get_blob(self, digest: str) -> bytes:
        try:
            data = self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobError(f"blob {digest[:16]}... is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobError(f"blob {digest[:16]}... is damaged or half-written")
        return data

    def collect_garbage(self, keep: Iterable[str]) -> int:
        """Deletes every blob not in ``keep``; returns how many went."""
        keep = set(keep)
        removed = 0
        for path in (self.root / "blobs").glob("*/*"):
            if path.name not in keep and not path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _blob_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BlobError(f"{digest!r} is not a blob name")
        return self.root / "blobs" / digest[:2] / digest

    # --- federation state ---------------------------------------------------------------------
    def get_state(self, key: str, default: str) -> str:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_state(self, **values: Any) -> None:
        with self._db:
            self._db.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, str(v)) for k, v in values.items()],
            )

    def commits(self, round_: int) -> dict[str, str]:
        return dict(self._db.execute("SELECT site, blob FROM commits WHERE round = ?", (round_,)).fetchall())

    def put_commit(self, round_: int, site: str, blob: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO commits (round, site, blob) VALUES (?, ?, ?)", (round_, site, blob))

    def uploads(self, round_: int) -> dict[str, UploadRow]:
        rows = self._db.execute(
            "SELECT site, chunks, bytes, digest, vector_length, blobs FROM uploads WHERE round = ?", (round_,)
        ).fetchall()
        return {r[0]: UploadRow(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5]))) for r in rows}

    def put_upload(self, round_: int, row: UploadRow) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO uploads (round, site, chunks, bytes, digest, vector_length, blobs) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (round_, row.site, row.chunks, row.bytes, row.digest, row.vector_length, json.dumps(row.blobs)),
            )

    def drop_upload(self, round_: int, site: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM uploads WHERE round = ? AND site = ?", (round_, site))

    def put_global(self, row: GlobalRow, *, round_: int, phase: str, started: float) -> None:
        """Stores the state that opens ``row.round`` and moves the federation there (its round and
        phase clocks starting at ``started``), in one transaction."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO globals (round, vector_length, blobs) VALUES (?, ?, ?)",
                (row.round, row.vector_length, json.dumps(row.blobs)),
            )
            self._db.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [("round", str(round_)), ("phase", phase), ("phase_started", str(started)),
                 ("round_started", str(started))],
            )

    def global_row(self, round_: int) -> GlobalRow | None:
        row = self._db.execute("SELECT vector_length, blobs FROM globals WHERE round = ?", (round_,)).fetchone()
        return GlobalRow(round_, row[0], tuple(json.loads(row[1]))) if row else None

    def retired(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT site, reason FROM retired").fetchall())

    def put_retired(self, site: str, round_: int, reason: str) -> None:
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO retired (site, round, reason) VALUES (?, ?, ?)", (site, round_, reason))

    # --- CKKS key epochs ----------------------------------------------------------------------
    def key_epochs(self) -> list[KeyEpoch]:
        """Every key epoch so far, oldest first."""
        rows = self._db.execute("SELECT epoch, fingerprint, round, site FROM key_epochs ORDER BY epoch").fetchall()
        return [KeyEpoch(*row) for row in rows]

    def put_key(self, key: KeyEpoch, envelopes: dict[str, bytes], state: GlobalRow | None, *, created: float) -> None:
        """Starts ``key`` in one transaction: its envelopes replace the previous epoch's, and ``state``
        (a rotation's re-encrypted global state) replaces every stored global state."""
        with self._db:
            self._db.execute("INSERT INTO key_epochs (epoch, fingerprint, round, site, created) VALUES (?, ?, ?, ?, ?)",
                             (key.epoch, key.fingerprint, key.round, key.site, created))
            self._db.execute("DELETE FROM envelopes")
            self._db.executemany("INSERT INTO envelopes (epoch, site, envelope) VALUES (?, ?, ?)",
                                 [(key.epoch, site, payload) for site, payload in envelopes.items()])
            if state is not None:
                self._db.execute("DELETE FROM globals")
                self._db.execute("INSERT INTO globals (round, vector_length, blobs) VALUES (?, ?, ?)",
                                 (state.round, state.vector_length, json.dumps(state.blobs)))

    def envelope(self, epoch: int, site: str) -> bytes | None:
        row = self._db.execute("SELECT envelope FROM envelopes WHERE epoch = ? AND site = ?", (epoch, site)).fetchone()
        return bytes(row[0]) if row else None

    # --- files for other tools ----------------------------------------------------------------
    def append_record(self, name: str, record: dict[str, Any]) -> None:
        # NaN (e.g. the Dice of a site without validation slices) is not JSON: it is written as null
        line = (json.dumps(_nan_to_null(record), sort_keys=True) + "\n").encode()
        with open(self.root / name, "a+b") as fh:  # appends go to the end, wherever the read left off
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = b"\n" + line  # a line cut short by a crash is ended, so that this record is whole
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read_records(self, name: str, *, skip_bad: bool = False) -> list[dict[str, Any]]:
        """The records of ``name``; with ``skip_bad``, a line that does not parse (e.g. cut short by a
        crash) is left out instead of raising ValueError."""
        path = self.root / name
        if not path.exists():
            return []
        records = []
        for line in path.read_text(errors="replace" if skip_bad else "strict").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if not skip_bad:
                    raise
        return records

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_atomic(self.root / name, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return value
