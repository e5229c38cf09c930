"""The coordinator's round state machine: join, commit weights, receive updates, aggregate.

It never imports gRPC and never sees a plaintext update: it adds payloads through a
``PayloadSummer`` that, for CKKS, holds a parameters-only context (no secret, no public key).

One round r, for the sites S of the federation::

    commit   every site in S sends E(n_k)            -> E(N) = sum E(n_k) becomes available
    upload   every committed site streams E(n_k/N * delta_k), chunk by chunk; each finished
             upload is folded into a running sum (memory O(model), not O(sites x model))
    close    E(theta_{r+1} - theta_0) = E(theta_r - theta_0) + sum      -> round r+1 opens

Errors are ``FederationError`` with a code that the transport maps to a gRPC status.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from fedfms_secure.errors import CryptoError, FederationError
from fedfms_secure.protocol import (
    PHASE_COMMIT,
    PHASE_DONE,
    PHASE_UPLOAD,
    Chunk,
    CommitAck,
    Plan,
    Receipt,
    SiteStatus,
    Status,
    WeightTotal,
)
from fedfms_secure.server.store import StateStore

log = logging.getLogger("fedfms_secure.server")

MAX_CHUNKS = 1 << 20


class PayloadSummer:  # the protocol the coordinator needs (see fedfms_secure.crypto.codec)
    def parse(self, payload: bytes) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def dump(self, obj: Any) -> bytes: ...
    def size(self, obj: Any) -> int: ...


@dataclass
class _Site:
    joined: bool = False
    last_seen: float = 0.0


class Coordinator:
    """State of a federation on the server side; thread-safe."""

    def __init__(
        self,
        plan: Plan,
        sites: Sequence[str],
        summer: PayloadSummer,
        fingerprint: str,
        store: StateStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.plan = plan
        self.fingerprint = fingerprint
        self._summer = summer
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._sites = {name: _Site() for name in sites}
        self._round = 0
        self._phase = PHASE_COMMIT
        self._vector_length: int | None = None
        self._chunks: int | None = None
        self._reported: dict[int, set[str]] = {}
        self.finished = threading.Event()
        self._reset_round()

    # --- join and status ----------------------------------------------------------------------
    def join(self, site: str, fingerprint: str) -> int:
        """Registers ``site``; returns the round now open."""
        with self._lock:
            record = self._touch(site)
            if self.plan.scheme != "plain":
                self._check_fingerprint(fingerprint)
            if not record.joined:
                log.info("site joined", extra={"site": site, "round": self._round})
            record.joined = True
            return self._round

    def status(self, site: str | None = None) -> Status:
        """Progress of the federation; ``site`` (when a site asks) must be a member."""
        with self._lock:
            if site is not None:
                self._touch(site)
            sites = tuple(
                SiteStatus(
                    name=name,
                    joined=rec.joined,
                    committed=name in self._commits,
                    uploaded=name in self._receipts,
                    last_seen=rec.last_seen,
                )
                for name, rec in sorted(self._sites.items())
            )
            return Status(self.plan.federation, self._round, self.plan.rounds, self._phase, sites)

    # --- global state -------------------------------------------------------------------------
    def global_state(self, site: str, round_: int) -> tuple[int, int]:
        """(vector_length, chunks) of the state that opens ``round_``; (0, 0) for round 0."""
        with self._lock:
            self._touch(site)
            if round_ > self._round:
                raise FederationError(
                    f"round {round_} has not started (the federation is at round {self._round}); "
                    "wait for the current round to close",
                    "failed_precondition",
                )
        if round_ == 0:
            return 0, 0
        meta = self._store.global_meta(round_)
        if meta is None:
            raise FederationError(f"no global state is kept for round {round_}", "not_found")
        return meta["vector_length"], meta["chunks"]

    def global_chunk(self, round_: int, index: int) -> bytes:
        return self._store.read_global_chunk(round_, index)

    # --- commit -------------------------------------------------------------------------------
    def commit_weight(self, site: str, round_: int, fingerprint: str, payload: bytes) -> CommitAck:
        """Records E(n_k) of ``site``; once every site has committed, E(N) is formed."""
        with self._lock:
            self._touch(site)
            self._check_fingerprint(fingerprint)
            self._check_round(round_, PHASE_COMMIT, "commit")
            if site in self._commits:
                if self._commits[site][0] != payload:
                    raise FederationError(
                        f"site {site} already committed a different weight for round {round_}",
                        "failed_precondition",
                    )
            else:
                self._commits[site] = (payload, self._parse(payload, what="encrypted weight"))
                log.info("weight committed", extra={"site": site, "round": round_})
            if len(self._commits) == len(self._sites):
                total = None
                for _, obj in self._commits.values():
                    total = obj if total is None else self._summer.add(total, obj)
                self._weight_total = self._summer.dump(total)
                self._phase = PHASE_UPLOAD
                self._write_status()
            return CommitAck(round_, len(self._commits), len(self._sites))

    def weight_total(self, site: str, round_: int) -> WeightTotal:
        """E(N) for ``round_``, or ``ready=False`` while commits are missing."""
        with self._lock:
            self._touch(site)
            if round_ != self._round or self._weight_total is None:
                if round_ > self._round or (round_ == self._round and self._phase == PHASE_COMMIT):
                    return WeightTotal(round_, ready=False)
                raise FederationError(f"round {round_} is closed", "failed_precondition")
            if site not in self._commits:
                raise FederationError(
                    f"site {site} did not commit a weight in round {round_}", "failed_precondition"
                )
            return WeightTotal(round_, True, self._weight_total, len(self._commits))

    # --- upload -------------------------------------------------------------------------------
    def receive_upload(self, site: str, chunks: Iterable[Chunk]) -> Receipt:
        """Consumes one upload stream, stages it on disk, then folds it into the round's sum."""
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            raise FederationError("empty upload stream: send at least one chunk", "invalid_argument")
        with self._lock:
            self._touch(site)
            self._check_round(first.round, PHASE_UPLOAD, "upload")
            if site not in self._commits:
                raise FederationError(
                    f"site {site} must commit its weight before uploading in round {first.round}",
                    "failed_precondition",
                )
        staging = self._store.start_upload(first.round, site)
        try:
            receipt = self._stage(site, first, it, staging)
        except BaseException:
            self._store.discard_upload(staging)
            raise
        with self._lock:
            self._check_round(first.round, PHASE_UPLOAD, "upload")
            previous = self._receipts.get(site)
            if previous is not None:
                self._store.discard_upload(staging)
                if previous == receipt:
                    return previous
                raise FederationError(
                    f"site {site} already uploaded a different update for round {first.round}",
                    "failed_precondition",
                )
            if self._vector_length is None:  # the first upload fixes the vector's shape
                self._vector_length, self._chunks = first.vector_length, first.total
            try:
                self._check_chunk(first, first, first.index)
            except FederationError:
                self._store.discard_upload(staging)
                raise
            self._store.finish_upload(staging, first.round, site, receipt.__dict__)
            self._fold(site, receipt)
            self._receipts[site] = receipt
            log.info("update received", extra={"site": site, "round": first.round, "bytes": receipt.bytes})
            if set(self._receipts) == set(self._commits):
                self._close_round()
            return receipt

    def _stage(self, site: str, first: Chunk, rest: Iterable[Chunk], staging) -> Receipt:
        digest = hashlib.sha256()
        size = 0
        expected_index = 0
        for chunk in _chain(first, rest):
            self._check_chunk(chunk, first, expected_index)
            self._parse_chunk(chunk)
            self._store.stage_chunk(staging, chunk.index, chunk.payload)
            digest.update(chunk.payload)
            size += len(chunk.payload)
            expected_index += 1
        if expected_index != first.total:
            raise FederationError(
                f"upload stream ended after {expected_index} of {first.total} chunks: resend the whole update",
                "invalid_argument",
            )
        return Receipt(first.round, first.total, size, digest.hexdigest())

    def _check_chunk(self, chunk: Chunk, first: Chunk, expected_index: int) -> None:
        self._check_fingerprint(chunk.fingerprint)
        if (chunk.round, chunk.total, chunk.vector_length) != (first.round, first.total, first.vector_length):
            raise FederationError(
                "chunk headers changed within one stream (round, total or vector_length)", "invalid_argument"
            )
        if chunk.index != expected_index:
            raise FederationError(
                f"chunk {chunk.index} arrived where chunk {expected_index} was expected: send chunks in order",
                "invalid_argument",
            )
        if not 0 < first.total <= MAX_CHUNKS or first.vector_length <= 0:
            raise FederationError("total and vector_length must be positive", "invalid_argument")
        if self._vector_length is not None and (first.vector_length, first.total) != (
            self._vector_length,
            self._chunks,
        ):
            raise FederationError(
                f"update has {first.vector_length} values in {first.total} chunks, the federation's "
                f"vector has {self._vector_length} in {self._chunks}: are all sites on the same plan?",
                "invalid_argument",
            )

    def _parse_chunk(self, chunk: Chunk) -> None:
        obj = self._parse(chunk.payload, what=f"chunk {chunk.index}")
        if self._summer.size(obj) != chunk.num_values:
            raise FederationError(
                f"chunk {chunk.index} holds {self._summer.size(obj)} values, its header says {chunk.num_values}",
                "invalid_argument",
            )

    def _fold(self, site: str, receipt: Receipt) -> None:
        for index, payload in enumerate(self._store.iter_upload(receipt.round, site, receipt.chunks)):
            obj = self._summer.parse(payload)
            current = self._round_sum.get(index)
            self._round_sum[index] = obj if current is None else self._summer.add(current, obj)

    # --- metrics ------------------------------------------------------------------------------
    def report_metrics(self, site: str, round_: int, metrics: dict[str, float]) -> None:
        with self._lock:
            self._touch(site)
            if round_ > self._round:
                raise FederationError(f"round {round_} has not started", "failed_precondition")
            record = {"site": site, "round": round_, "time": self._clock(), **metrics}
            self._store.append_record("metrics.jsonl", record)
            self._reported.setdefault(round_, set()).add(site)
            if self._phase == PHASE_DONE and self._reported.get(self.plan.rounds - 1, set()) >= set(self._sites):
                self.finished.set()

    # --- internals ----------------------------------------------------------------------------
    def _close_round(self) -> None:
        previous = self._store.global_meta(self._round) if self._round > 0 else None
        chunks = []
        for index in range(self._chunks or 0):
            total = self._round_sum[index]
            if previous is not None:
                total = self._summer.add(self._summer.parse(self._store.read_global_chunk(self._round, index)), total)
            chunks.append(self._summer.dump(total))
        self._store.write_global(self._round + 1, chunks, self._vector_length or 0)
        self._store.append_record(
            "rounds.jsonl",
            {
                "round": self._round,
                "participants": sorted(self._receipts),
                "seconds": self._clock() - self._round_started,
                "bytes_received": sum(r.bytes for r in self._receipts.values()),
            },
        )
        log.info("round closed", extra={"round": self._round, "sites": len(self._receipts)})
        self._round += 1
        self._phase = PHASE_DONE if self._round >= self.plan.rounds else PHASE_COMMIT
        self._reset_round()

    def _reset_round(self) -> None:
        self._commits: dict[str, tuple[bytes, Any]] = {}
        self._weight_total: bytes | None = None
        self._receipts: dict[str, Receipt] = {}
        self._round_sum: dict[int, Any] = {}
        self._round_started = self._clock()
        self._write_status()

    def _write_status(self) -> None:
        self._store.write_json(
            "status.json",
            {"round": self._round, "phase": self._phase, "total_rounds": self.plan.rounds},
        )

    def _touch(self, site: str) -> _Site:
        record = self._sites.get(site)
        if record is None:
            raise FederationError(
                f"{site!r} is not a site of federation {self.plan.federation!r}; "
                "ask the operator to add it (`fedfms-secure keys add-client`)",
                "permission_denied",
            )
        record.last_seen = self._clock()
        return record

    def _check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise FederationError(
                f"CKKS context mismatch: the request was made under context {fingerprint or '(none)'}, "
                f"this federation uses {self.fingerprint}; use a key bundle exported from the same "
                "provisioning folder as the server's",
                "invalid_argument",
            )

    def _check_round(self, round_: int, phase: str, action: str) -> None:
        if self._phase == PHASE_DONE:
            raise FederationError(f"the federation has finished all {self.plan.rounds} rounds", "failed_precondition")
        if round_ != self._round:
            raise FederationError(
                f"cannot {action} for round {round_}: the federation is at round {self._round}",
                "failed_precondition",
            )
        if phase != self._phase:
            raise FederationError(
                f"cannot {action} in round {round_} now: the round is in its {self._phase} phase",
                "failed_precondition",
            )

    def _parse(self, payload: bytes, *, what: str) -> Any:
        try:
            return self._summer.parse(payload)
        except CryptoError as exc:
            raise FederationError(f"{what} is not a valid ciphertext: {exc}", "invalid_argument") from exc


def _chain(first: Chunk, rest: Iterable[Chunk]) -> Iterable[Chunk]:
    yield first
    yield from rest
