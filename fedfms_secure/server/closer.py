"""Closing a round: E(theta_{r+1} - theta_0) = E(theta_r - theta_0) + the round's uploads. The
running sum starts each round as the stored state E(theta_r - theta_0) (loaded while the sites
train), so closing only writes it out as one pack (one fsync), then records it with the next
round's opening in one SQLite transaction.

With ``background=True`` (the daemon) a closer thread does the work off the request path: the
call that brought the last upload returns once that upload is stored, and the coordinator's lock
is held only to take the round's snapshot and to record the result, never while the state is
written. Meanwhile the round refuses new uploads (repeats of accepted ones are still answered).
A crash at any point leaves either the round open with all its uploads accepted (a restart
closes it again) or the next round opened; a half-written pack is deleted at start-up.
``RoundCloser`` is a base of ``Coordinator`` and works on its state.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from fedfms_secure.errors import FederationError
from fedfms_secure.he.aggregate import PayloadAggregator
from fedfms_secure.protocol import PHASE_COMMIT, PHASE_DONE, Plan, Receipt
from fedfms_secure.server.store import BlobError, GlobalRow, StateStore

log = logging.getLogger("fedfms_secure.server")

#: seconds between two tries of a background close that failed (e.g. a full disk)
RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class _Closing:
    """What a round close needs, taken under the coordinator's lock."""

    round: int
    previous: GlobalRow | None
    chunks: int
    vector_length: int
    receipts: dict[str, Receipt]
    zero_delta: tuple[str, ...]
    upload_packs: tuple[str, ...]


class RoundCloser:
    """Closes rounds, inline (under the caller's lock) or on a thread of its own."""

    plan: Plan
    _aggregator: PayloadAggregator
    _store: StateStore
    _lock: threading.Lock
    _sum_lock: threading.Lock
    _clock: Callable[[], float]
    _round: int
    _phase: str
    _phase_started: float
    _round_started: float
    _closing: bool
    _commits: dict[str, Any]
    _weight_total: bytes | None
    _receipts: dict[str, Receipt]
    _round_sum: dict[int, Any]
    _accepted_packs: dict[str, str]
    _vector_length: int | None
    _chunks: int | None
    _close_wanted: threading.Event | None
    _closer_thread: threading.Thread | None
    _closer_stopping: bool
    _sum_ready: threading.Event
    _sum_generation: int
    _sum_error: str
    _previous: GlobalRow | None

    _drop_streams: Callable[[str], None]
    _rebuild_sums: Callable[[int], None]
    _parse: Callable[..., Any]
    _sum: Callable[..., Any]
    _write_status: Callable[[], None]

    def _start_closer(self) -> None:
        self._close_wanted = threading.Event()
        self._closer_thread = threading.Thread(target=self._closer_loop, name="round-closer", daemon=True)
        self._closer_thread.start()

    def stop_closer(self, timeout: float) -> None:
        """Lets a round close in progress finish (at most ``timeout`` seconds), then ends the closer
        thread; a close cut short is done again by the next start."""
        if self._close_wanted is None or self._closer_thread is None:
            return
        self._closer_stopping = True
        self._close_wanted.set()
        self._closer_thread.join(timeout)

    def _reload_sum(self) -> None:
        """The running sum starts over from the stored state that opens the current round (caller
        holds ``_lock``): loaded by the closer thread, or at once without one."""
        self._previous = self._summed_state(self._round)
        self._sum_generation += 1
        self._sum_ready.clear()
        with self._sum_lock:
            self._round_sum, self._sum_error = {}, ""
        if self._close_wanted is not None:
            self._close_wanted.set()
        else:
            self._load_sum(self._sum_generation, self._previous)

    def _load_sum(self, generation: int, previous: GlobalRow | None) -> None:
        """Parses ``previous`` into the running sum (no lock held while it reads and parses)."""
        loaded: dict[int, Any] = {}
        error = ""
        try:
            if previous is not None:
                for index, payload in enumerate(self._store.iter_global(previous)):
                    loaded[index] = self._parse(payload, what="stored global state")
                if len(loaded) != previous.chunks:
                    raise BlobError(f"it holds {len(loaded)} chunks, not {previous.chunks}")
        except (BlobError, FederationError) as exc:
            error = (f"the stored global state of round {previous.round if previous else 0} is damaged ({exc}): "
                     "stop the server and restore its --state folder from a backup")
            log.error("cannot load the global state", extra={"error": error})
        with self._sum_lock:
            if generation != self._sum_generation:
                return  # superseded (e.g. a key rotation replaced the state meanwhile)
            self._round_sum, self._sum_error = loaded, error
            self._sum_ready.set()

    def _close_round(self) -> None:
        """Closes the open round (caller holds ``_lock``); in the background when a closer runs."""
        if self._closing:
            return
        self._closing = True
        if self._close_wanted is not None:
            self._close_wanted.set()
            return
        try:
            job = self._begin_close()
            self._finish_close(job, self._write_state(job))
        finally:
            self._closing = False
        self._store.delete_packs(job.upload_packs)

    def _closer_loop(self) -> None:
        assert self._close_wanted is not None
        while True:
            self._close_wanted.wait()
            self._close_wanted.clear()
            try:
                with self._lock:
                    job = self._begin_close() if self._closing else None
                    load = None if self._sum_ready.is_set() else (self._sum_generation, self._previous)
                if job is not None:
                    row = self._write_state(job)
                    with self._lock:
                        self._finish_close(job, row)
                        load = (self._sum_generation, self._previous)
                    self._store.delete_packs(job.upload_packs)
                if self._closer_stopping:
                    return
                if load is not None:
                    self._load_sum(*load)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                log.error("could not close the round; trying again", extra={"error": str(exc)}, exc_info=exc)
                if self._closer_stopping:
                    return
                threading.Timer(RETRY_SECONDS, self._close_wanted.set).start()

    def _begin_close(self) -> _Closing:
        """The round's snapshot (caller holds ``_lock``); uploads still in flight are left out."""
        with self._sum_lock:
            self._drop_streams(f"round {self._round} closed without this upload: the site takes part again "
                               f"from round {self._round + 1}")
            packs = tuple(self._accepted_packs.values())
        return _Closing(self._round, self._previous, self._chunks or 0, self._vector_length or 0,
                        dict(self._receipts), tuple(sorted(set(self._commits) - set(self._receipts))), packs)

    def _write_state(self, job: _Closing) -> GlobalRow:
        """The state that opens the next round (the running sum: the previous state plus every
        upload), written as one pack. No folding runs meanwhile (the round is closing), so the
        sum is read without a lock.

        A round without uploads (every committed site retired first) carries the state over
        unchanged: the same pack, or none while nothing was ever uploaded (theta_0).
        """
        next_round = job.round + 1
        previous = job.previous
        if not job.receipts:
            log.warning("every committed site retired before uploading: the global state carries over unchanged",
                        extra={"round": job.round})
            if previous is None:
                return GlobalRow(next_round, 0, 0)
            return GlobalRow(next_round, previous.vector_length, previous.chunks, previous.pack, previous.blobs)
        if self._sum_error:
            raise FederationError(self._sum_error, "failed_precondition")
        writer = self._store.new_pack("global")
        try:
            for index in range(job.chunks):
                writer.append(self._aggregator.dump(self._round_sum[index]))
            writer.commit()
        except BaseException:
            writer.discard()
            raise
        return GlobalRow(next_round, job.vector_length, job.chunks, writer.name)

    def _finish_close(self, job: _Closing, row: GlobalRow) -> None:
        """Records the new state and opens the next round (caller holds ``_lock``)."""
        next_round = job.round + 1
        next_phase = PHASE_DONE if next_round >= self.plan.rounds else PHASE_COMMIT
        now = self._clock()
        closed = {
            "round": job.round,
            "participants": sorted(job.receipts),
            "zero_delta": list(job.zero_delta),
            "seconds": now - self._round_started,
            "bytes_received": sum(r.bytes for r in job.receipts.values()),
        }
        # one transaction moves the federation to the next round, with its clocks and who contributed
        self._store.put_global(row, round_=next_round, phase=next_phase, started=now, contributors=job.receipts)
        self._round, self._phase = next_round, next_phase
        self._phase_started = self._round_started = now
        self._commits, self._weight_total, self._receipts = {}, None, {}
        with self._sum_lock:
            self._accepted_packs = {}
        self._closing = False
        self._reload_sum()
        log.info("round closed", extra={"round": job.round, "sites": len(job.receipts)})
        try:  # bookkeeping for tools: a failure here must not fail the round
            self._store.append_record("rounds.jsonl", closed)
            # keep the newest two global states; the round's uploads are folded into them
            self._store.delete_packs(self._store.stale_global_packs(next_round - 1))
            self._store.collect_garbage(set(row.blobs) | (set(job.previous.blobs) if job.previous else set()))
            self._write_status()
        except OSError as exc:
            log.error("could not write the round's records", extra={"round": job.round, "error": str(exc)})

    def _summed_state(self, round_: int) -> GlobalRow | None:
        """The stored state that opens ``round_``; None while it is theta_0 (round 0, or no round so
        far has summed an upload: its row holds no chunks)."""
        row = self._store.global_row(round_) if round_ > 0 else None
        return row if row is not None and row.chunks else None

    def _fold_one(self, index: int, obj: Any) -> None:
        """The running sum at ``index`` plus ``obj``, in place (caller holds ``_sum_lock`` or is alone)."""
        if self._sum_error:
            raise FederationError(self._sum_error, "failed_precondition")
        current = self._round_sum.get(index)
        self._round_sum[index] = obj if current is None else self._sum([current, obj], what=f"chunk {index}")

    def _fold_pack(self, name: str, chunks: int) -> None:
        """Adds a stored upload to the running sum (at start-up); on a damaged pack, what it added is
        taken back out and BlobError is raised."""
        count = 0
        try:
            for index, payload in enumerate(self._store.read_pack(name)):
                self._fold_one(index, self._parse(payload, what=f"stored chunk {index}"))
                count += 1
            if count != chunks:
                raise BlobError(f"pack {name} holds {count} chunks, its row says {chunks}")
        except (BlobError, FederationError):
            if count:
                with self._sum_lock:
                    self._rebuild_sums(count)
            raise
