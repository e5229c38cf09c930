"""The coordinator's round state machine: join, commit weights, receive updates, aggregate.

It never imports gRPC and never sees a plaintext update: it adds payloads through a
``PayloadAggregator`` that, for CKKS, holds a parameters-only context (no secret, no public key).

One round r, for the sites S of the federation::

    commit   every site in S sends E(n_k)            -> E(N) = sum E(n_k) becomes available
    upload   every committed site streams E(n_k/N * delta_k); each chunk is folded into the
             round's running sum as it arrives (memory O(model), not O(sites x model)) and the
             upload is kept as one pack file until the round closes (``uploads.py``)
    close    E(theta_{r+1} - theta_0) = E(theta_r - theta_0) + sum      -> round r+1 opens
             (``closer.py``; off the request path with ``background_close``)

State changes only after every check and every addition of a request has succeeded, so a
malformed or interrupted request leaves nothing behind, and each change is one SQLite
transaction (see ``store.py``): after a crash, even a ``kill -9``, the coordinator resumes the
same round with the commits and uploads it had accepted. With ``round_deadline`` set, a phase
that has waited that long goes on with the ``min_sites`` sites it has: the commit phase with
those that committed, the upload phase with those that uploaded (a committed site that did not
upload counts as a zero delta). Errors are ``FederationError`` with a code that the transport
maps to a gRPC status.

**CKKS key epochs** (``key_epochs.py``): every ciphertext must be made under the current key
epoch's context; until the first epoch exists, commits are refused and sites wait for their key.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from fedfms_secure.he.ckks import is_fingerprint
from fedfms_secure.he.aggregate import PayloadAggregator
from fedfms_secure.errors import CryptoError, FederationError
from fedfms_secure.protocol import (
    NO_KEY,
    PHASE_COMMIT,
    PHASE_DONE,
    PHASE_UPLOAD,
    Chunk,
    CommitAck,
    KeyEpoch,
    Plan,
    Receipt,
    SiteStatus,
    Status,
    WeightTotal,
)
from fedfms_secure.server.checks import check_metrics, expected_values
from fedfms_secure.server.closer import RoundCloser
from fedfms_secure.server.key_epochs import KeyEpochRegistry
from fedfms_secure.server.uploads import UploadIntake, UploadStream
from fedfms_secure.server.store import BlobError, GlobalRow, StateStore

log = logging.getLogger("fedfms_secure.server")

class Coordinator(KeyEpochRegistry, UploadIntake, RoundCloser):
    """State of a federation on the server side; thread-safe.

    ``vector_length`` is the plan's (``plan_sizes.plan_vector_length``): every upload must have
    it; None lets the first accepted upload fix it. ``round_quota_bytes`` caps the disk that a
    round's accepted and in-flight uploads may use (None: no cap). With ``background_close`` a
    thread of its own closes each round, so that no call waits for it; without (tools and
    tests), the call that completes a round closes it before it returns.
    """

    def __init__(
        self,
        plan: Plan,
        sites: Sequence[str],
        aggregator: PayloadAggregator,
        fingerprint: str | None,
        store: StateStore,
        clock: Callable[[], float] = time.time,
        *,
        round_deadline: float | None = None,
        min_sites: int | None = None,
        round_quota_bytes: int | None = None,
        vector_length: int | None = None,
        background_close: bool = False,
    ) -> None:
        self.plan = plan
        # the fingerprint every ciphertext must carry now: "plain" without HE; with CKKS the current
        # key epoch's ("" until a site has run he-init). ``fingerprint`` is the provisioning host's
        # key (a dealer-made bundle), or None when the key is made at a site.
        self._dealt = fingerprint if plan.scheme != "plain" and is_fingerprint(fingerprint) else None
        self.fingerprint = "plain" if plan.scheme == "plain" else ""
        self._aggregator = aggregator
        self._store = store
        self._clock = clock
        self._deadline = round_deadline
        self._min_sites = min_sites if min_sites is not None else (1 if round_deadline is not None else None)
        self._lock = threading.Lock()
        self._sum_lock = threading.Lock()
        self._round_sum: dict[int, Any] = {}
        self._streams: dict[str, UploadStream] = {}
        self._accepted_packs: dict[str, str] = {}
        self._closing = False
        self._close_wanted: threading.Event | None = None
        self._closer_thread: threading.Thread | None = None
        self._closer_stopping = False
        self._sum_ready = threading.Event()
        self._sum_generation = 0
        self._sum_error = ""
        self._previous: GlobalRow | None = None
        self._joined: dict[str, bool] = {name: False for name in sites}
        self._last_seen: dict[str, float] = {name: 0.0 for name in sites}
        self._reported: dict[int, set[str]] = {}
        self._uploading: set[str] = set()
        self._staged_bytes: dict[str, int] = {}  # bytes of the uploads in progress, per site
        self._round_quota = round_quota_bytes
        # the plan's vector length; None (tools and tests only) lets the first accepted upload fix it
        self._plan_length = vector_length
        self._publishing = False
        self._keys: list[KeyEpoch] = []
        self._key = NO_KEY
        self._retired = {name: reason for name, reason in store.retired().items() if name in self._joined}
        self.finished = threading.Event()
        if background_close:
            self._start_closer()
        self._restore()

    def _restore(self) -> None:
        """Rebuilds the open round from the database: commits, E(N), accepted uploads, the sum."""
        store = self._store
        if partial := store.discard_partial_blobs():
            log.warning("discarded half-written files left by a crash", extra={"files": partial})
        self._restore_keys()
        self._round = int(store.get_state("round", "0"))
        self._phase = store.get_state("phase", PHASE_COMMIT)
        self._phase_started = float(store.get_state("phase_started", str(self._clock())))
        self._round_started = float(store.get_state("round_started", str(self._clock())))
        current = self._summed_state(self._round)
        self._vector_length: int | None = current.vector_length if current else self._plan_length
        self._chunks: int | None = current.chunks if current else None
        self._commits: dict[str, Any] = {}
        for site, blob in store.commits(self._round).items():
            try:
                self._commits[site] = self._aggregator.parse(store.get_blob(blob))
            except (BlobError, CryptoError) as exc:
                log.warning("discarded a stored commit", extra={"site": site, "reason": str(exc)})
        self._weight_total: bytes | None = None
        if self._phase == PHASE_UPLOAD:
            self._weight_total = self._aggregator.dump(self._sum(self._commits.values(), what="the committed weights"))
        self._receipts: dict[str, Receipt] = {}
        self._previous = current
        self._load_sum(self._sum_generation, current)
        for site, row in store.uploads(self._round).items():
            try:
                if not row.pack:
                    raise BlobError("it was stored by an older server, chunk by chunk")
                self._fold_pack(row.pack, row.chunks)
            except (BlobError, FederationError) as exc:
                store.drop_upload(self._round, site)  # the site uploads it again
                log.warning("discarded a stored upload", extra={"site": site, "reason": str(exc)})
                continue
            self._accepted_packs[site] = row.pack
            self._receipts[site] = Receipt(self._round, row.chunks, row.bytes, row.digest)
            self._vector_length, self._chunks = row.vector_length, row.chunks
        if self._deadline is not None and self._phase != PHASE_DONE:
            self._phase_started = self._clock()  # a restart gives the sites a whole deadline to reconnect
        self._restore_reports()
        self._progress()
        if self._round > 0 or self._commits:
            log.info("resumed from the state folder", extra={"round": self._round, "phase": self._phase,
                                                             "commits": len(self._commits), "uploads": len(self._receipts)})
        self._write_status()

    def _restore_reports(self) -> None:
        """Who reported the last round's metrics, so that a restart once done need not wait for them again."""
        try:
            records = self._store.read_records("metrics.jsonl", skip_bad=True)  # a line cut short by a crash is skipped
        except OSError as exc:
            log.warning("could not read metrics.jsonl: the sites' final reports are awaited again",
                        extra={"error": str(exc)})
            return
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record.get("site") in self._joined:
                self._reported.setdefault(record["round"], set()).add(record["site"])
        self._check_finished()

    # --- join and status ----------------------------------------------------------------------
    def join(self, site: str, fingerprint: str) -> int:
        """Registers ``site``; returns the round now open.

        With CKKS, a site may join with the current key, an earlier epoch's (it fetches the new one
        next) or none at all ("": it waits for its envelope); a context the federation never used
        is refused.
        """
        with self._lock:
            self._touch(site)
            if self.plan.scheme != "plain" and fingerprint and not self._known_key(fingerprint):
                self._refuse_context(fingerprint)
            if not self._joined[site]:
                log.info("site joined", extra={"site": site, "round": self._round})
            self._joined[site] = True
            return self._round

    def contributed_rounds(self, site: str) -> list[int]:
        """The rounds whose aggregate took ``site``'s upload, oldest first (kept in the state folder,
        so a site that lost its own state still learns what its privacy budget has spent)."""
        with self._lock:
            self._touch(site)
            return self._store.contributed_rounds(site)

    def status(self, site: str | None = None) -> Status:
        """Progress of the federation; ``site`` (when a site asks) must be a member."""
        with self._lock:
            if site is not None:
                self._touch(site)
            sites = tuple(
                SiteStatus(
                    name=name,
                    joined=self._joined[name],
                    committed=name in self._commits,
                    uploaded=name in self._receipts,
                    last_seen=self._last_seen[name],
                    retired=name in self._retired,
                    retired_reason=self._retired.get(name, ""),
                )
                for name in sorted(self._joined)
            )
            deadline = (
                self._phase_started + self._deadline
                if self._deadline is not None and self._phase != PHASE_DONE else 0.0
            )
            return Status(self.plan.federation, self._round, self.plan.rounds, self._phase, sites, deadline, self._key)

    # --- global state -------------------------------------------------------------------------
    def global_state(self, site: str, round_: int) -> int:
        """Number of chunks of the state that opens ``round_`` (0 for round 0: theta_0 is public)."""
        with self._lock:
            self._touch(site)
            row = self._global_row(round_)
        return row.chunks if row is not None else 0

    def global_chunks(self, site: str, round_: int) -> Iterator[Chunk]:
        """The chunks of the state that opens ``round_``, read once, in order (none for round 0).

        The checks run before the first chunk is asked for; the stream reads a pack that was open
        before a later round could collect it."""
        with self._lock:
            self._touch(site)
            row = self._global_row(round_)
        if row is None:
            return iter(())
        payloads = self._store.iter_global(row)
        return self._chunk_stream(row.round, row.chunks, row.vector_length, payloads)

    def global_chunk(self, round_: int, index: int) -> Chunk:
        """Chunk ``index`` of the state that opens ``round_`` (reads the state up to it)."""
        with self._lock:
            row = self._store.global_row(round_)
        if row is None or not 0 <= index < row.chunks:
            raise FederationError(f"the global state of round {round_} has no chunk {index}", "not_found")
        for chunk in self._chunk_stream(round_, row.chunks, row.vector_length, self._store.iter_global(row)):
            if chunk.index == index:
                return chunk
        raise AssertionError("unreachable")

    def _global_row(self, round_: int) -> Any:
        if round_ > self._round:
            raise FederationError(
                f"round {round_} has not started (the federation is at round {self._round}); "
                "wait for the current round to close",
                "failed_precondition",
            )
        if round_ == 0:
            return None
        # closing a round keeps the newest two global states only
        row = self._store.global_row(round_) if round_ >= self._round - 1 else None
        if row is None:
            raise FederationError(
                f"the server keeps no global state for round {round_}; ask for round {self._round}",
                "not_found",
            )
        return row if row.chunks else None

    def _chunk_stream(self, round_: int, total: int, length: int, payloads: Iterator[bytes]) -> Iterator[Chunk]:
        index = 0
        try:
            for index, payload in enumerate(payloads):
                yield Chunk(round=round_, index=index, total=total,
                            num_values=expected_values(index, length, self._aggregator.chunk_values),
                            fingerprint=self.fingerprint, payload=payload, vector_length=length)
        except BlobError as exc:
            raise FederationError(
                f"the global state of round {round_} is no longer available ({exc}); ask for round {self._round}",
                "not_found",
            ) from None

    # --- commit -------------------------------------------------------------------------------
    def commit_weight(self, site: str, round_: int, fingerprint: str, payload: bytes) -> CommitAck:
        """Records E(n_k) of ``site``; once every site has committed, E(N) is formed.

        A site may commit again while the commit phase lasts (the newest weight counts); once
        E(N) is formed, a repeated commit of a committed site is answered with the same ack.
        """
        with self._lock:
            self._touch(site)
            self._check_fingerprint(fingerprint)
            if round_ == self._round and self._phase == PHASE_UPLOAD and site in self._commits:
                return CommitAck(round_, len(self._commits), len(self._active()))
            self._check_active(site)
            if round_ == self._round and self._phase == PHASE_UPLOAD:
                raise FederationError(
                    f"the commit phase of round {round_} closed at its deadline without site {site}; "
                    f"it takes part again from round {round_ + 1}",
                    "failed_precondition",
                )
            self._check_round(round_, PHASE_COMMIT, "commit")
            obj = self._parse(payload, what="encrypted weight")
            if self._aggregator.size(obj) != 1:
                raise FederationError(
                    f"an encrypted weight holds one value, this one holds {self._aggregator.size(obj)}",
                    "invalid_argument",
                )
            commits = {**self._commits, site: obj}
            complete = self._active() <= set(commits)
            total = self._sum(commits.values(), what="the committed weights") if complete else None
            self._store.put_commit(round_, site, self._store.put_blob(payload))
            self._commits = commits
            if complete:
                self._start_uploads(total)
            log.info("weight committed", extra={"site": site, "round": round_})
            self._write_status()
            return CommitAck(round_, len(commits), len(self._active()))

    def weight_total(self, site: str, round_: int) -> WeightTotal:
        """E(N) for ``round_``, or ``ready=False`` while commits are missing."""
        with self._lock:
            self._touch(site)
            if round_ > self._round or (round_ == self._round and self._phase == PHASE_COMMIT):
                return WeightTotal(round_, ready=False)
            if round_ < self._round or self._weight_total is None:
                raise FederationError(f"round {round_} is closed", "failed_precondition")
            if site not in self._commits:
                raise FederationError(
                    f"site {site} did not commit a weight in round {round_}", "failed_precondition"
                )
            return WeightTotal(round_, True, self._weight_total, len(self._commits))

    # --- metrics ------------------------------------------------------------------------------
    def report_metrics(self, site: str, round_: int, metrics: dict[str, float]) -> None:
        """Records that ``site`` is done with ``round_``: only ``contributed`` and bytes, what the server
        sees anyway (:func:`check_metrics` refuses a score or any other name before anything is written).

        One report per site and round is kept: a repeated one (a retry after a lost reply, or a
        restarted site) is acknowledged and not written again, so ``metrics.jsonl`` stays small.
        """
        check_metrics(metrics)
        with self._lock:
            self._touch(site)
            if round_ >= self._round:
                raise FederationError(
                    f"round {round_} has not closed yet: report its metrics after it has", "failed_precondition"
                )
            if site in self._reported.get(round_, set()):
                log.info("repeated metrics report ignored", extra={"site": site, "round": round_})
                return
            record = {"site": site, "round": round_, "time": self._clock(), **metrics}
            self._store.append_record("metrics.jsonl", record)
            self._reported.setdefault(round_, set()).add(site)
            self._check_finished()

    # --- retirement and deadlines ------------------------------------------------------------
    def retire(self, site: str, round_: int, reason: str) -> int:
        """``site`` stops contributing from ``round_`` on; the federation goes on with the others.

        A site that already committed in the current round counts as a zero delta (its weight is in
        E(N), so the round's weights sum to less than one: a conservative step).
        """
        with self._lock:
            self._touch(site)
            if site not in self._retired:
                self._retired[site] = reason[:500] or "no reason given"
                self._store.put_retired(site, round_, self._retired[site])
                log.warning("site retired", extra={"site": site, "round": round_, "reason": self._retired[site]})
            if not self._active():
                log.warning("every site has retired: the federation stops", extra={"round": self._round})
                self._set_phase(PHASE_DONE)
            else:
                self._progress()
            self._write_status()
            self._check_finished()
            return len(self._active())

    def tick(self) -> None:
        """Applies ``round_deadline``: a phase that has waited that long goes on with a quorum."""
        if self._deadline is None:
            return
        with self._lock:
            waited = self._clock() - self._phase_started
            if self._phase == PHASE_DONE or self._closing or waited < self._deadline:
                return
            if self._phase == PHASE_COMMIT and len(self._commits) >= self._min_sites:
                log.warning("commit deadline: the round goes on without the sites that did not commit",
                            extra={"round": self._round, "committed": len(self._commits),
                                   "missing": ",".join(sorted(self._active() - set(self._commits)))})
                self._start_uploads(self._sum(self._commits.values(), what="the committed weights"))
            elif self._phase == PHASE_UPLOAD and len(self._receipts) >= min(self._min_sites, len(self._commits)):
                log.warning("upload deadline: committed sites that did not upload count as a zero delta",
                            extra={"round": self._round, "uploaded": len(self._receipts),
                                   "missing": ",".join(sorted(set(self._commits) - set(self._receipts)))})
                self._close_round()

    # --- internals ----------------------------------------------------------------------------
    def _active(self) -> set[str]:
        return set(self._joined) - set(self._retired)

    def _check_active(self, site: str) -> None:
        if site in self._retired:
            raise FederationError(
                f"site {site} has retired ({self._retired[site]}); it no longer contributes", "failed_precondition"
            )

    def _set_phase(self, phase: str) -> None:
        self._phase, self._phase_started = phase, self._clock()
        self._store.set_state(round=self._round, phase=phase, phase_started=self._phase_started,
                              round_started=self._round_started)

    def _start_uploads(self, weight_total: Any) -> None:
        """E(N) is formed from the committed sites, which are the round's participants from now on."""
        self._weight_total = self._aggregator.dump(weight_total)
        self._set_phase(PHASE_UPLOAD)
        self._write_status()

    def _progress(self) -> None:
        """Moves on when every active site has committed, or every committed one has uploaded (also
        after a restart, when a crash fell between two writes)."""
        if self._phase == PHASE_COMMIT and self._commits and self._active() <= set(self._commits):
            self._start_uploads(self._sum(self._commits.values(), what="the committed weights"))
        if self._phase == PHASE_UPLOAD:
            pending = set(self._commits) - set(self._retired) - set(self._receipts)
            # with no upload yet, only a round whose committed sites have all retired closes (unchanged)
            if not pending and (self._receipts or set(self._commits) <= set(self._retired)):
                self._close_round()

    def _check_finished(self) -> None:
        if self._phase == PHASE_DONE and self._reported.get(self.plan.rounds - 1, set()) >= self._active():
            self.finished.set()

    def _write_status(self) -> None:
        self._store.write_json(
            "status.json",
            {"round": self._round, "phase": self._phase, "total_rounds": self.plan.rounds,
             "committed": sorted(self._commits), "uploaded": sorted(self._receipts), "key_epoch": self._key.epoch},
        )

    def _touch(self, site: str) -> None:
        if site not in self._joined:
            raise FederationError(
                f"{site!r} is not a site of federation {self.plan.federation!r}; "
                "ask the operator to provision it",
                "permission_denied",
            )
        self._last_seen[site] = self._clock()

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
            return self._aggregator.parse(payload)
        except CryptoError as exc:
            raise FederationError(f"{what} is not a valid ciphertext: {exc}", "invalid_argument") from exc

    def _sum(self, objs: Iterable[Any], *, what: str) -> Any:
        total = None
        try:
            for obj in objs:
                total = obj if total is None else self._aggregator.add(total, obj)
        except CryptoError as exc:
            raise FederationError(f"cannot add {what}: {exc}", "invalid_argument") from exc
        return total
