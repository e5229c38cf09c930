"""Upload intake of the coordinator: one stream per site at a time, staged on disk chunk by
chunk, checked, then folded into the round's running sum (memory O(model), not O(sites x model)).

A refused or broken stream leaves nothing: the chunks it staged are deleted at once, and while
it runs its bytes count against the round's disk quota together with every accepted upload.
``UploadIntake`` is a base of ``Coordinator`` and works on its state under its lock.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any, Callable, Iterable, Sequence

from fedfms_secure.errors import FederationError, UpdateAlreadyReceived
from fedfms_secure.he.aggregate import PayloadAggregator
from fedfms_secure.protocol import PHASE_UPLOAD, Chunk, Receipt
from fedfms_secure.server.checks import check_chunk, check_layout
from fedfms_secure.server.store import StateStore, UploadRow

log = logging.getLogger("fedfms_secure.server")


class UploadIntake:
    """Receives the round's uploads and keeps their running sum."""

    # the coordinator's state that the intake reads and changes (set by ``Coordinator.__init__``)
    _aggregator: PayloadAggregator
    _store: StateStore
    _lock: threading.Lock
    _round: int
    _commits: dict[str, Any]
    _receipts: dict[str, Receipt]
    _round_sum: dict[int, Any]
    _uploading: set[str]
    _staged_bytes: dict[str, int]
    _round_quota: int | None
    _vector_length: int | None
    _chunks: int | None

    _touch: Callable[[str], None]
    _check_round: Callable[[int, str, str], None]
    _check_fingerprint: Callable[[str], None]
    _parse: Callable[..., Any]
    _sum: Callable[..., Any]
    _progress: Callable[[], None]
    _write_status: Callable[[], None]

    def receive_upload(self, site: str, chunks: Iterable[Chunk]) -> Receipt:
        """Consumes one upload stream, stages it on disk, then folds it into the round's sum.

        A site uploads one stream at a time: a second is refused before it is read. The staged
        chunks of a refused or broken stream are deleted at once.
        """
        with self._lock:
            self._touch(site)
            if site in self._uploading:
                raise FederationError(
                    f"an upload from site {site} is still in progress; retry when it has ended",
                    "unavailable",
                )
            self._uploading.add(site)
        created: list[str] = []
        try:
            first = next(iter_chunks := iter(chunks), None)
            if first is None:
                raise FederationError("empty upload stream: send at least one chunk", "invalid_argument")
            with self._lock:
                self._check_upload(site, first)
            receipt, blobs = self._stage(site, first, iter_chunks, created)
            with self._lock:
                return self._accept(site, first, receipt, blobs, created)
        finally:
            with self._lock:
                self._uploading.discard(site)
                self._staged_bytes.pop(site, None)
                if created:
                    self._store.delete_blobs(created)
                    log.info("deleted a refused upload's staged chunks", extra={"site": site, "blobs": len(created)})

    def _check_upload(self, site: str, first: Chunk) -> None:
        """Whether ``site`` may upload the stream that ``first`` opens."""
        if first.round < self._round and site in self._store.uploads(first.round):
            # a retry after a lost reply (e.g. the server restarted), once the round has closed
            raise UpdateAlreadyReceived(
                f"site {site} already uploaded its update for round {first.round}, which has closed with it",
                "failed_precondition",
            )
        self._check_round(first.round, PHASE_UPLOAD, "upload")
        if site not in self._commits:
            raise FederationError(
                f"site {site} must commit its weight before uploading in round {first.round}",
                "failed_precondition",
            )
        check_layout(first, self._aggregator.chunk_values, self._vector_length)

    def _accept(self, site: str, first: Chunk, receipt: Receipt, blobs: tuple[str, ...],
                created: list[str]) -> Receipt:
        """Folds a staged upload into the round's sum; ``created`` is emptied once it is stored."""
        self._check_round(first.round, PHASE_UPLOAD, "upload")
        previous = self._receipts.get(site)
        if previous is not None:
            if previous == receipt:
                return previous
            raise UpdateAlreadyReceived(
                f"site {site} already uploaded a different update for round {first.round}", "failed_precondition"
            )
        # without a pinned length, another site's upload may have fixed the shape meanwhile
        check_layout(first, self._aggregator.chunk_values, self._vector_length)
        round_sum = self._folded(self._round_sum, blobs)
        self._store.put_upload(
            first.round, UploadRow(site, receipt.chunks, receipt.bytes, receipt.digest, first.vector_length, blobs)
        )
        created.clear()  # referenced by the stored upload now
        self._vector_length, self._chunks = first.vector_length, first.total
        self._round_sum, self._receipts = round_sum, {**self._receipts, site: receipt}
        log.info("update received", extra={"site": site, "round": first.round, "bytes": receipt.bytes})
        self._progress()
        self._write_status()
        return receipt

    def _folded(self, round_sum: dict[int, Any], blobs: Sequence[str]) -> dict[int, Any]:
        """``round_sum`` plus the upload stored as ``blobs`` (a new dict; the input is untouched)."""
        out = dict(round_sum)
        for index, blob in enumerate(blobs):
            obj = self._parse(self._store.get_blob(blob), what=f"chunk {index}")
            out[index] = obj if index not in out else self._sum([out[index], obj], what=f"chunk {index}")
        return out

    def _stage(self, site: str, first: Chunk, rest: Iterable[Chunk],
               created: list[str]) -> tuple[Receipt, tuple[str, ...]]:
        """Validates the stream chunk by chunk and stores each as a blob (the ones it wrote are
        added to ``created``); nothing is referenced yet. The round's disk quota counts every
        accepted upload and every stream in progress."""
        digest = hashlib.sha256()
        size = 0
        expected_index = 0
        blobs = []
        for chunk in _chain(first, rest):
            self._check_fingerprint(chunk.fingerprint)
            check_chunk(chunk, first, expected_index, self._aggregator.chunk_values)
            obj = self._parse(chunk.payload, what=f"chunk {chunk.index}")
            if self._aggregator.size(obj) != chunk.num_values:
                raise FederationError(
                    f"chunk {chunk.index} holds {self._aggregator.size(obj)} values, its header says {chunk.num_values}",
                    "invalid_argument",
                )
            with self._lock:
                self._charge(site, len(chunk.payload))
                blob, new = self._store.stage_blob(chunk.payload)
            if new:
                created.append(blob)
            blobs.append(blob)
            digest.update(chunk.payload)
            size += len(chunk.payload)
            expected_index += 1
        if expected_index != first.total:
            raise FederationError(
                f"upload stream ended after {expected_index} of {first.total} chunks: resend the whole update",
                "invalid_argument",
            )
        return Receipt(first.round, first.total, size, digest.hexdigest()), tuple(blobs)

    def _charge(self, site: str, size: int) -> None:
        """Counts ``size`` staged bytes of ``site`` against the round's disk quota."""
        used = sum(r.bytes for r in self._receipts.values()) + sum(self._staged_bytes.values()) + size
        if self._round_quota is not None and used > self._round_quota:
            raise FederationError(
                f"round {self._round} has used its disk quota of {self._round_quota} bytes: this upload of site "
                f"{site} is refused; is it the plan's model? (the operator sets the quota at the server)",
                "resource_exhausted",
            )
        self._staged_bytes[site] = self._staged_bytes.get(site, 0) + size


def _chain(first: Chunk, rest: Iterable[Chunk]) -> Iterable[Chunk]:
    yield first
    yield from rest
