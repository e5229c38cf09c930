"""The coordinator's folder: SQLite (WAL) for the federation's state, content-addressed blobs for
ciphertexts, and JSON files that other tools read.

Layout under ``--state DIR``::

    state.db              rounds and phases, commits, received uploads, global states, retired sites,
                          CKKS key epochs and the sealed envelopes of the current one (opaque bytes)
    blobs/ab/abcdef...    one small ciphertext each (an encrypted weight), named by the sha256 of its bytes
    packs/NAME.pack       many ciphertexts in one file: an accepted upload, or a global state; each
                          record is [8-byte length][sha256 of the payload][payload]
    address.json          the HOST:PORT the server is bound to (written once listening)
    status.json           the latest status snapshot (for the demo's progress display)
    metrics.jsonl         what each site reported after a round: contributed, bytes up and down (no scores)
    rounds.jsonl          one record per closed round: participants, seconds, bytes
    revocations.json      every certificate revocation the server has seen and the highest CRL number
                          (written atomically by ``transport/revocation.py``; it outlives the bundle's crl.pem)

A blob or pack is written under a temporary name, flushed once and renamed, and its content is
checked on every read (a blob against its name, a pack record against its digest), so a
half-written or damaged file is detected and never used. Every state
change is one SQLite transaction. Nothing here can decrypt anything: the server holds no CKKS
secret key, and the envelopes that carry it between sites are sealed to each site's own key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

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
CREATE TABLE IF NOT EXISTS contributions (site TEXT NOT NULL, round INTEGER NOT NULL, PRIMARY KEY (site, round));
CREATE TABLE IF NOT EXISTS envelopes (
    epoch INTEGER NOT NULL, site TEXT NOT NULL, envelope BLOB NOT NULL, PRIMARY KEY (epoch, site));
"""


class BlobError(Exception):
    """A blob is missing, or its content does not match its name (half-written or damaged)."""


_PACK_MAGIC = b"FFPACK1\n"
_RECORD = struct.Struct(">Q32s")


@dataclass(frozen=True)
class UploadRow:
    site: str
    chunks: int
    bytes: int
    digest: str
    vector_length: int
    pack: str  # "" for an upload stored by an older server (per-chunk blobs): it is sent again


@dataclass(frozen=True)
class GlobalRow:
    round: int
    vector_length: int
    chunks: int
    pack: str = ""  # the pack holding the chunks; "" with per-chunk ``blobs`` (an older server's)
    blobs: tuple[str, ...] = ()


def _encode_chunks(pack: str, chunks: int, blobs: tuple[str, ...]) -> str:
    return json.dumps({"pack": pack, "chunks": chunks}) if pack else json.dumps(list(blobs))


def _decode_global(round_: int, length: int, text: str) -> GlobalRow:
    value = json.loads(text)
    if isinstance(value, dict):
        return GlobalRow(round_, length, int(value["chunks"]), str(value["pack"]))
    return GlobalRow(round_, length, len(value), "", tuple(value))


class PackWriter:
    """Appends payloads to ``NAME.pack.tmp``; ``commit`` makes it durable (one fsync) as ``NAME.pack``.

    Each payload is written at once (unbuffered), so the records appended so far can be read back
    from ``tmp_path`` while the writer goes on.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp_path = path.with_name(path.name + ".tmp")
        self.name = path.stem
        self.count = 0
        self._fh: BinaryIO | None = open(self.tmp_path, "xb", buffering=0)
        os.fchmod(self._fh.fileno(), 0o600)
        self._fh.write(_PACK_MAGIC)

    @property
    def readable_path(self) -> Path:
        """Where the records written so far can be read: the final name once committed."""
        return self.tmp_path if self._fh is not None else self.path

    def append(self, payload: bytes, digest: bytes | None = None) -> None:
        """Writes one record; ``digest``: the payload's sha256, when the caller has it already."""
        assert self._fh is not None, "append after commit or discard"
        self._fh.write(_RECORD.pack(len(payload), digest or hashlib.sha256(payload).digest()))
        self._fh.write(payload)
        self.count += 1

    def commit(self) -> None:
        """Flushes the pack to disk and gives it its final name."""
        assert self._fh is not None, "commit after commit or discard"
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.tmp_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def read_pack(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """The payloads of the pack at ``path`` (the first ``limit``), each checked against its digest."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise BlobError(f"pack {path.name} is missing") from None
    with fh:
        if fh.read(len(_PACK_MAGIC)) != _PACK_MAGIC:
            raise BlobError(f"pack {path.name} is not a pack file")
        index = 0
        while limit is None or index < limit:
            head = fh.read(_RECORD.size)
            if not head and limit is None:
                return
            if len(head) != _RECORD.size:
                raise BlobError(f"pack {path.name} ends inside record {index}: it is half-written or damaged")
            size, digest = _RECORD.unpack(head)
            payload = fh.read(size)
            if len(payload) != size or hashlib.sha256(payload).digest() != digest:
                raise BlobError(f"record {index} of pack {path.name} is damaged or half-written")
            yield payload
            index += 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Files and database of one coordinator. Not thread-safe: the coordinator serialises access."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "packs").mkdir(exist_ok=True)
            self._db = sqlite3.connect(self.root / "state.db", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            with self._db:  # a folder from a server that kept no contributions: its closed rounds' uploads
                self._db.execute(
                    "INSERT OR IGNORE INTO contributions (site, round) SELECT site, round FROM uploads "
                    "WHERE round < CAST(COALESCE((SELECT value FROM state WHERE key = 'round'), '0') AS INTEGER)")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the server state folder {self.root}: {exc}; check the path "
                              "and its permissions, or give another --state") from exc

    def discard_partial_blobs(self) -> int:
        """Deletes blob and pack files a crash left half-written, and packs the open round no longer
        needs; returns how many half-written ones went. The owning server calls this once at
        start-up, before any write, and no other reader of the folder may."""
        partial = [*(self.root / "blobs").glob("*/*.tmp"), *(self.root / "packs").glob("*.tmp")]
        for tmp in partial:
            tmp.unlink(missing_ok=True)
        # what the open round still needs: its uploads, its state and the one before (the rest was
        # left by a crash between a round's close and its clean-up)
        current = int(self.get_state("round", "0"))
        referenced = {row.pack for row in self._all_globals() if row.round >= current - 1} | {
            _upload_pack(text) for (text,) in self._db.execute("SELECT blobs FROM uploads WHERE round = ?", (current,))}
        for path in (self.root / "packs").glob("*.pack"):
            if path.stem not in referenced:
                path.unlink(missing_ok=True)
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

    # --- packs --------------------------------------------------------------------------------
    def new_pack(self, kind: str) -> PackWriter:
        """A new pack, named ``kind-<random>``, not referenced by anything until recorded."""
        return PackWriter(self.root / "packs" / f"{kind}-{secrets.token_hex(12)}.pack")

    def pack_path(self, name: str) -> Path:
        if not name or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789-_" for c in name):
            raise BlobError(f"{name!r} is not a pack name")
        return self.root / "packs" / f"{name}.pack"

    def read_pack(self, name: str, limit: int | None = None) -> Iterator[bytes]:
        return read_pack(self.pack_path(name), limit)

    def delete_packs(self, names: Iterable[str]) -> None:
        for name in names:
            if name:
                self.pack_path(name).unlink(missing_ok=True)

    def iter_global(self, row: GlobalRow) -> Iterator[bytes]:
        """The chunks of a global state, in order, each checked; BlobError once one is missing or damaged."""
        if row.pack:
            count = 0
            for payload in self.read_pack(row.pack):
                count += 1
                yield payload
            if count != row.chunks:
                raise BlobError(f"pack {row.pack} holds {count} chunks, its row says {row.chunks}")
        else:
            for blob in row.blobs:
                yield self.get_blob(blob)

    def stale_global_packs(self, before_round: int) -> list[str]:
        """Packs of the global states that open a round before ``before_round``."""
        rows = self._all_globals()
        kept = {row.pack for row in rows if row.round >= before_round}  # a carried-over state shares its pack
        return [row.pack for row in rows if row.round < before_round and row.pack and row.pack not in kept]

    def _all_globals(self) -> list[GlobalRow]:
        rows = self._db.execute("SELECT round, vector_length, blobs FROM globals").fetchall()
        return [_decode_global(*row) for row in rows]

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
        return {r[0]: UploadRow(r[0], r[1], r[2], r[3], r[4], _upload_pack(r[5])) for r in rows}

    def put_upload(self, round_: int, row: UploadRow) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO uploads (round, site, chunks, bytes, digest, vector_length, blobs) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (round_, row.site, row.chunks, row.bytes, row.digest, row.vector_length, json.dumps({"pack": row.pack})),
            )

    def drop_upload(self, round_: int, site: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM uploads WHERE round = ? AND site = ?", (round_, site))

    def put_global(self, row: GlobalRow, *, round_: int, phase: str, started: float,
                   contributors: Iterable[str] = ()) -> None:
        """Stores the state that opens ``row.round`` and moves the federation there (its round and
        phase clocks starting at ``started``), in one transaction; ``contributors`` are the sites
        whose uploads the closed round ``row.round - 1`` summed."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO globals (round, vector_length, blobs) VALUES (?, ?, ?)",
                (row.round, row.vector_length, _encode_chunks(row.pack, row.chunks, row.blobs)),
            )
            self._db.executemany("INSERT OR IGNORE INTO contributions (site, round) VALUES (?, ?)",
                                 [(site, row.round - 1) for site in contributors])
            self._db.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [("round", str(round_)), ("phase", phase), ("phase_started", str(started)),
                 ("round_started", str(started))],
            )

    def global_row(self, round_: int) -> GlobalRow | None:
        row = self._db.execute("SELECT vector_length, blobs FROM globals WHERE round = ?", (round_,)).fetchone()
        return _decode_global(round_, row[0], row[1]) if row else None

    def contributed_rounds(self, site: str) -> list[int]:
        """The rounds whose aggregate took ``site``'s upload, oldest first."""
        rows = self._db.execute("SELECT round FROM contributions WHERE site = ? ORDER BY round", (site,)).fetchall()
        return [r[0] for r in rows]

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
                                 (state.round, state.vector_length, _encode_chunks(state.pack, state.chunks, state.blobs)))

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


def _upload_pack(text: str) -> str:
    value = json.loads(text)
    return str(value.get("pack", "")) if isinstance(value, dict) else ""


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return value
