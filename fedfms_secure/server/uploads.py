"""Upload intake of the coordinator: one stream per site at a time, each chunk parsed once, folded
into the round's running sum as it arrives (in place: memory O(model), not O(sites x model)) and
appended to one pack file of that upload, made durable by one fsync when the stream ends.

No disk work happens under the coordinator's lock, and the sum has a lock of its own that only
memory work holds, so concurrent uploads do not take turns. A stream that fails after folding
some chunks (a broken connection, a bad chunk, a round that closed without it) has those chunks
taken back out: the affected sums are rebuilt from the packs of the accepted uploads and of the
other streams still in flight. Its pack is deleted, and while it runs its bytes count against
the round's disk quota together with every accepted upload. ``UploadIntake`` is a base of
``Coordinator`` and works on its state under its locks (the coordinator's lock first).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from fedfms_secure.errors import FederationError, UpdateAlreadyReceived
from fedfms_secure.he.aggregate import PayloadAggregator
from fedfms_secure.protocol import PHASE_UPLOAD, Chunk, Receipt
from fedfms_secure.server.checks import check_chunk, check_layout
from fedfms_secure.server.store import GlobalRow, PackWriter, StateStore, UploadRow, read_pack

log = logging.getLogger("fedfms_secure.server")


@dataclass(eq=False)
class UploadStream:
    """An upload being folded into the round's sum."""

    site: str
    round: int
    writer: PackWriter | None = None
    folded: int = 0  # chunks of this stream in the round's sum
    dropped: str = ""  # set when the round closed without it: why
    stored: bool = False  # recorded as an accepted upload


class UploadIntake:
    """Receives the round's uploads and keeps their running sum."""

    # the coordinator's state that the intake reads and changes (set by ``Coordinator.__init__``)
    _aggregator: PayloadAggregator
    _store: StateStore
    _lock: threading.Lock
    _sum_lock: threading.Lock  # guards the four below; taken after ``_lock`` where both are held
    _sum_ready: threading.Event  # set once the round's stored state is in the sum
    _previous: GlobalRow | None  # the stored state that opens the round (None: theta_0)
    _round_sum: dict[int, Any]
    _streams: dict[str, UploadStream]
    _accepted_packs: dict[str, str]
    _round: int
    _closing: bool
    _commits: dict[str, Any]
    _receipts: dict[str, Receipt]
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
    _fold_one: Callable[[int, Any], None]

    def receive_upload(self, site: str, chunks: Iterable[Chunk]) -> Receipt:
        """Consumes one upload stream, folding it into the round's sum as it arrives; returns once
        the upload is stored (the round closes apart from this call).

        A site uploads one stream at a time: a second is refused before it is read. A repeated
        upload of an accepted one is read to its end and compared, never folded again.
        """
        with self._lock:
            self._touch(site)
            if site in self._uploading:
                raise FederationError(
                    f"an upload from site {site} is still in progress; retry when it has ended",
                    "unavailable",
                )
            self._uploading.add(site)
        stream: UploadStream | None = None
        try:
            first = next(iter_chunks := iter(chunks), None)
            if first is None:
                raise FederationError("empty upload stream: send at least one chunk", "invalid_argument")
            with self._lock:
                if self._check_upload(site, first):
                    stream = UploadStream(site, first.round)
                    with self._sum_lock:
                        self._streams[site] = stream
            if stream is not None:
                stream.writer = self._store.new_pack("upload")
            receipt = self._take(site, first, iter_chunks, stream)
            if stream is not None and stream.writer is not None:
                stream.writer.commit()  # one fsync, outside every lock
            with self._lock:
                return self._accept(site, first, receipt, stream)
        finally:
            with self._lock:
                self._uploading.discard(site)
                self._staged_bytes.pop(site, None)
            if stream is not None and not stream.stored:
                self._drop_stream(stream)

    def _check_upload(self, site: str, first: Chunk) -> bool:
        """Whether ``site`` may upload the stream that ``first`` opens; True: it is folded (False:
        a repeat of an accepted upload, only compared)."""
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
        if site in self._receipts:
            return False
        if self._closing:
            raise FederationError(f"round {first.round} is closing without an upload from site {site}; it "
                                  f"takes part again from round {first.round + 1}", "failed_precondition")
        return True

    def _take(self, site: str, first: Chunk, rest: Iterable[Chunk], stream: UploadStream | None) -> Receipt:
        """Checks the stream chunk by chunk, parsing and hashing each once; folds and stores it (with
        ``stream``). The receipt's digest is the sha256 of the chunks' sha256 digests, in order. The
        round's disk quota counts every accepted upload and every stream in progress."""
        digest = hashlib.sha256()
        size = 0
        expected_index = 0
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
            record = hashlib.sha256(chunk.payload).digest()
            if stream is not None and stream.writer is not None:
                stream.writer.append(chunk.payload, record)
                self._fold(stream, chunk.index, obj)
            digest.update(record)  # the upload's digest: over its chunks' digests
            size += len(chunk.payload)
            expected_index += 1
        if expected_index != first.total:
            raise FederationError(
                f"upload stream ended after {expected_index} of {first.total} chunks: resend the whole update",
                "invalid_argument",
            )
        return Receipt(first.round, first.total, size, digest.hexdigest())

    def _fold(self, stream: UploadStream, index: int, obj: Any) -> None:
        """Adds chunk ``index`` of ``stream`` to the round's sum, in place."""
        if not self._sum_ready.is_set():  # the round's stored state is still being loaded
            self._sum_ready.wait()
        with self._sum_lock:
            if stream.dropped:
                raise FederationError(stream.dropped, "failed_precondition")
            self._fold_one(index, obj)
            stream.folded += 1

    def _accept(self, site: str, first: Chunk, receipt: Receipt, stream: UploadStream | None) -> Receipt:
        """Records a complete upload (already in the round's sum) and moves the round on."""
        self._check_round(first.round, PHASE_UPLOAD, "upload")
        previous = self._receipts.get(site)
        if stream is None or previous is not None:
            if previous == receipt:
                return previous
            raise UpdateAlreadyReceived(
                f"site {site} already uploaded a different update for round {first.round}", "failed_precondition"
            )
        if stream.dropped:
            raise FederationError(stream.dropped, "failed_precondition")
        # without a pinned length, another site's upload may have fixed the shape meanwhile
        check_layout(first, self._aggregator.chunk_values, self._vector_length)
        assert stream.writer is not None
        self._store.put_upload(first.round, UploadRow(site, receipt.chunks, receipt.bytes, receipt.digest,
                                                      first.vector_length, stream.writer.name))
        stream.stored = True
        with self._sum_lock:
            del self._streams[site]
            self._accepted_packs[site] = stream.writer.name
        self._vector_length, self._chunks = first.vector_length, first.total
        self._receipts = {**self._receipts, site: receipt}
        log.info("update received", extra={"site": site, "round": first.round, "bytes": receipt.bytes})
        self._progress()
        self._write_status()
        return receipt

    def _drop_stream(self, stream: UploadStream) -> None:
        """Takes a failed stream's chunks back out of the round's sum and deletes its pack."""
        with self._sum_lock:
            if self._streams.get(stream.site) is stream:
                del self._streams[stream.site]
                if stream.folded:
                    self._rebuild_sums(stream.folded)
        if stream.writer is not None:
            stream.writer.discard()
            log.info("deleted a refused upload's staged chunks", extra={"site": stream.site, "chunks": stream.writer.count})

    def _drop_streams(self, reason: str) -> None:
        """The round closes: every stream still in flight is left out of its sum (caller holds ``_sum_lock``)."""
        touched = max((s.folded for s in self._streams.values()), default=0)
        for stream in self._streams.values():
            stream.dropped = reason
        self._streams.clear()
        if touched:
            self._rebuild_sums(touched)

    def _rebuild_sums(self, count: int) -> None:
        """Sums ``0..count-1`` again from the round's stored state, the accepted uploads and the
        streams in flight (caller holds ``_sum_lock``): what a dropped stream had folded is gone."""
        for index in range(count):
            self._round_sum.pop(index, None)
        if self._previous is not None:
            for index, payload in enumerate(self._store.iter_global(self._previous)):
                if index >= count:
                    break
                self._fold_one(index, self._parse(payload, what="stored global state"))
        sources = [(self._store.pack_path(name), count) for name in self._accepted_packs.values()]
        sources += [(s.writer.readable_path, min(count, s.folded)) for s in self._streams.values()
                    if s.writer is not None and s.folded]
        for path, limit in sources:
            for index, payload in enumerate(read_pack(path, limit)):
                self._fold_one(index, self._parse(payload, what=f"stored chunk {index}"))
        log.info("rebuilt the round's sum without a dropped upload", extra={"round": self._round, "chunks": count})

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
