"""The CKKS key-epoch registry of the coordinator: which key every ciphertext must be made under.

Every ciphertext must be made under the context of the current key epoch (its fingerprint).
Epoch 1 is published by a site (``keys he-init``: a header and one sealed envelope per other
site) or, for a bundle made with the key by the provisioning host, is that key from the start;
until it exists, commits are refused (FAILED_PRECONDITION) and sites wait for their envelope.
``keys rotate-he`` publishes epoch e+1 together with the global state re-encrypted under it; it
is accepted atomically only at a round boundary (the round it names is open, in its commit phase,
with no commit yet), and from then on any ciphertext made under an earlier epoch is refused,
naming both. The envelopes are stored as opaque bytes: the server can open none.

``KeyEpochRegistry`` is a base of ``Coordinator`` and works on its state under its lock.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any, Callable, Iterable

from fedfms_secure.errors import CryptoError, FederationError
from fedfms_secure.he.aggregate import PayloadAggregator
from fedfms_secure.he.ckks import is_fingerprint
from fedfms_secure.keys.envelope import peek_header
from fedfms_secure.protocol import (
    PHASE_COMMIT,
    PHASE_DONE,
    Chunk,
    Envelope,
    KeyAck,
    KeyEpoch,
    KeyPublication,
    Plan,
    SealedEnvelope,
)
from fedfms_secure.server.checks import expected_values, shorten
from fedfms_secure.server.store import GlobalRow, PackWriter, StateStore

log = logging.getLogger("fedfms_secure.server")

MAX_ENVELOPE_BYTES = 8 << 20
WAITING_FOR_KEY = (
    "no CKKS key exists yet: the federation is waiting for keys he-init at one site "
    "(`fedfms-secure keys he-init --keys SITE_BUNDLE --server HOST:PORT`); sites wait and retry"
)


class KeyEpochRegistry:
    """The key epochs of a federation and the checks that tie ciphertexts to the current one."""

    # the coordinator's state that the registry reads and changes (set by ``Coordinator.__init__``)
    plan: Plan
    fingerprint: str
    _aggregator: PayloadAggregator
    _store: StateStore
    _clock: Callable[[], float]
    _lock: threading.Lock
    _joined: dict[str, bool]
    _commits: dict[str, Any]
    _round: int
    _phase: str
    _dealt: str | None
    _keys: list[KeyEpoch]
    _key: KeyEpoch
    _publishing: bool

    _touch: Callable[[str], None]
    _write_status: Callable[[], None]
    _reload_sum: Callable[[], None]

    def _restore_keys(self) -> None:
        """The key epochs from the database; a dealer-made key becomes epoch 1 of a fresh state."""
        if self.plan.scheme == "plain":
            return
        keys = self._store.key_epochs()
        if not keys and self._dealt is not None:
            first = KeyEpoch(1, self._dealt, 0, "")
            self._store.put_key(first, {}, None, created=self._clock())
            keys = [first]
        if keys:
            self._use_key(keys, self._summer_for(keys[-1].fingerprint))
        else:
            log.warning("no CKKS key yet: waiting for `keys he-init` at one site")

    def _use_key(self, keys: list[KeyEpoch], aggregator: PayloadAggregator) -> None:
        self._keys, self._key = keys, keys[-1]
        self.fingerprint, self._aggregator = self._key.fingerprint, aggregator

    def _summer_for(self, fingerprint: str) -> PayloadAggregator:
        """A aggregator that refuses payloads made under any other context than ``fingerprint``."""
        aggregator = copy.copy(self._aggregator)
        if hasattr(aggregator, "fingerprint"):
            aggregator.fingerprint = fingerprint  # type: ignore[attr-defined]
        return aggregator

    @property
    def key(self) -> KeyEpoch:
        """The CKKS key epoch in use (``NO_KEY`` before the first; always so without HE)."""
        with self._lock:
            return self._key

    def publish_keys(self, site: str, publication: KeyPublication,
                     items: Iterable[SealedEnvelope | Chunk]) -> KeyAck:
        """Starts key epoch ``publication.epoch``, made at ``site``: stores the envelopes (opaque)
        and, for a rotation, the global state re-encrypted under the new key, in one transaction.

        Accepted only at a round boundary: the round it names is open, in its commit phase, and no
        site has committed yet; otherwise FAILED_PRECONDITION (the publisher retries later).
        """
        with self._lock:
            self._touch(site)
            row = self._check_publication(publication)
            if self._publishing:
                raise FederationError("another key publication is in progress; retry when it has ended", "unavailable")
            self._publishing = True
            aggregator = self._summer_for(publication.fingerprint)
        writer: PackWriter | None = None
        try:
            envelopes, writer = self._stage_keys(site, publication, items, aggregator, row)
            if writer is not None:
                writer.commit()
            with self._lock:
                if self._check_publication(publication) != row:
                    raise FederationError("the global state changed while the new key was being published; publish "
                                          "again from the current state", "failed_precondition")
                key = KeyEpoch(publication.epoch, publication.fingerprint, publication.round, site)
                state = GlobalRow(row.round, row.vector_length, row.chunks, writer.name) if row is not None and writer else None
                stale = self._store.stale_global_packs(1 << 62) if state is not None else []
                self._store.put_key(key, envelopes, state, created=self._clock())
                writer = None  # recorded
                previous = self._key
                self._use_key([*self._keys, key], aggregator)
                if state is not None:
                    self._reload_sum()  # the round's sum starts from the re-encrypted state
                log.info("CKKS key epoch started", extra={"epoch": key.epoch, "site": site, "round": key.round,
                                                          "fingerprint": key.fingerprint[:16],
                                                          "previous": previous.fingerprint[:16] or "none",
                                                          "envelopes": len(envelopes)})
                try:  # the state under the previous key is gone: nothing else is referenced now
                    if state is not None:
                        self._store.delete_packs(stale)
                        self._store.collect_garbage(())
                    self._write_status()
                except OSError as exc:
                    log.error("could not collect the previous key's state", extra={"error": str(exc)})
                return KeyAck(key, len(envelopes), state.chunks if state is not None else 0)
        finally:
            if writer is not None:
                writer.discard()
            with self._lock:
                self._publishing = False

    def envelope(self, site: str, epoch: int) -> Envelope:
        """``site``'s sealed envelope of key ``epoch`` (0: the current one), as stored: opaque bytes."""
        with self._lock:
            self._touch(site)
            if self.plan.scheme == "plain":
                raise FederationError("this federation runs without HE (--no-he): there is no CKKS key",
                                      "failed_precondition")
            key = self._key
            if key.epoch == 0:
                raise FederationError(WAITING_FOR_KEY, "not_found")
            if epoch not in (0, key.epoch):
                raise FederationError(
                    f"the server keeps the envelopes of the current key epoch ({key.epoch}) only, not of epoch {epoch}",
                    "not_found",
                )
            payload = self._store.envelope(key.epoch, site)
        if payload is not None:
            return Envelope(key, payload)
        if site == key.site:
            raise FederationError(
                f"site {site} made key epoch {key.epoch} itself: it keeps the context in its bundle's he/ folder",
                "not_found",
            )
        made_by = f"site {key.site}" if key.site else "the provisioning host"
        raise FederationError(
            f"key epoch {key.epoch} (made by {made_by}) holds no envelope for site {site}: it joined after the key was "
            "made, or its envelope key was unknown to that site; it gets the key at the next `keys rotate-he`",
            "not_found",
        )

    def _check_publication(self, pub: KeyPublication) -> GlobalRow | None:
        """Whether key epoch ``pub`` may start now; returns the global state it must re-encrypt."""
        if self.plan.scheme == "plain":
            raise FederationError("this federation runs without HE (--no-he): it has no CKKS key to publish",
                                  "failed_precondition")
        if not is_fingerprint(pub.fingerprint):
            raise FederationError(f"{shorten(pub.fingerprint)!r} is not a CKKS context fingerprint", "invalid_argument")
        if self._known_key(pub.fingerprint):
            raise FederationError("this context was an earlier key epoch's: a new epoch needs a new context",
                                  "invalid_argument")
        current = self._key
        if pub.epoch != current.epoch + 1 or pub.previous_fingerprint != current.fingerprint:
            now = (f"epoch {current.epoch} ({current.fingerprint}, made by {current.site or 'the provisioning host'})"
                   if current.epoch else "no key yet")
            raise FederationError(
                f"key epoch {pub.epoch} replacing {shorten(pub.previous_fingerprint) or 'no key'} cannot start: the federation "
                f"has {now}; " + ("only `keys rotate-he` can replace it" if current.epoch else "publish epoch 1"),
                "failed_precondition",
            )
        if self._phase == PHASE_DONE:
            raise FederationError(f"the federation has finished all {self.plan.rounds} rounds", "failed_precondition")
        if pub.round != self._round:
            raise FederationError(
                f"the new key was made for round {pub.round}, but the federation is at round {self._round}: take the "
                "current global state and publish again",
                "failed_precondition",
            )
        if self._phase != PHASE_COMMIT or self._commits:
            raise FederationError(
                f"round {self._round} has started ({', '.join(sorted(self._commits)) or 'the upload phase'} committed): "
                "a new CKKS key takes effect only at a round boundary, before any commit; retry when round "
                f"{self._round + 1} opens",
                "failed_precondition",
            )
        row = self._store.global_row(self._round) if self._round > 0 else None
        chunks = row.chunks if row is not None else 0
        if pub.state_chunks != chunks:
            raise FederationError(
                f"the global state of round {self._round} has {chunks} chunks: a new key must come with all of them "
                f"re-encrypted, not {pub.state_chunks}",
                "invalid_argument",
            )
        if not 0 <= pub.envelopes <= len(self._joined):
            raise FederationError(f"{pub.envelopes} envelopes for a federation of {len(self._joined)} sites",
                                  "invalid_argument")
        return row

    def _stage_keys(self, site: str, pub: KeyPublication, items: Iterable[SealedEnvelope | Chunk],
                    aggregator: PayloadAggregator, row: GlobalRow | None) -> tuple[dict[str, bytes], PackWriter | None]:
        """Checks every envelope's routing (its header, unverified: only sites can verify) and every
        state chunk (layout, fingerprint, a valid ciphertext), storing the chunks in one pack (not
        yet durable: the caller commits it)."""
        envelopes: dict[str, bytes] = {}
        try:
            return self._take_keys(site, pub, items, aggregator, row, envelopes, writer_box := [])
        except BaseException:
            for w in writer_box:
                w.discard()
            raise

    def _take_keys(self, site: str, pub: KeyPublication, items: Iterable[SealedEnvelope | Chunk],
                   aggregator: PayloadAggregator, row: GlobalRow | None, envelopes: dict[str, bytes],
                   writer_box: list[PackWriter]) -> tuple[dict[str, bytes], PackWriter | None]:
        count = 0
        for item in items:
            if isinstance(item, SealedEnvelope):
                self._check_envelope(site, pub, item, envelopes)
                envelopes[item.recipient] = item.payload
                continue
            if row is None:
                raise FederationError(f"round {pub.round} has no global state to re-encrypt: send envelopes only",
                                      "invalid_argument")
            index = count
            if (item.round, item.index, item.total, item.vector_length) != (row.round, index, row.chunks,
                                                                             row.vector_length):
                raise FederationError(
                    f"state chunk {item.index} (round {item.round}, {item.total} chunks, {item.vector_length} values) "
                    f"does not fit: expected chunk {index} of {row.chunks} of the {row.vector_length}-value state "
                    f"of round {row.round}, in order",
                    "invalid_argument",
                )
            if item.fingerprint != pub.fingerprint:
                raise FederationError(
                    f"state chunk {index} was made under context {shorten(item.fingerprint)}, the new key is {pub.fingerprint}",
                    "invalid_argument",
                )
            try:
                obj = aggregator.parse(item.payload)
            except CryptoError as exc:
                raise FederationError(f"state chunk {index} is not a valid ciphertext: {exc}", "invalid_argument") from exc
            expected = expected_values(index, row.vector_length, aggregator.chunk_values)
            if item.num_values != expected or aggregator.size(obj) != expected:
                raise FederationError(
                    f"state chunk {index} holds {aggregator.size(obj)} values (header {item.num_values}), not {expected}",
                    "invalid_argument",
                )
            if not writer_box:
                writer_box.append(self._store.new_pack("global"))
            writer_box[0].append(aggregator.dump(obj))
            count += 1
        if len(envelopes) != pub.envelopes or count != pub.state_chunks:
            raise FederationError(
                f"the key publication announced {pub.envelopes} envelopes and {pub.state_chunks} state chunks, but "
                f"carried {len(envelopes)} and {count}: publish again",
                "invalid_argument",
            )
        return envelopes, (writer_box[0] if writer_box else None)

    def _check_envelope(self, site: str, pub: KeyPublication, item: SealedEnvelope, seen: dict[str, bytes]) -> None:
        name = item.recipient
        if name not in self._joined:
            raise FederationError(f"envelope for {shorten(name)!r}, which is not a site of this federation",
                                  "invalid_argument")
        if name == site:
            raise FederationError(f"site {site} sent an envelope to itself: the publishing site keeps its context",
                                  "invalid_argument")
        if name in seen:
            raise FederationError(f"two envelopes for site {name}", "invalid_argument")
        if not 0 < len(item.payload) <= MAX_ENVELOPE_BYTES:
            raise FederationError(f"the envelope for site {name} has {len(item.payload)} bytes", "invalid_argument")
        try:
            header = peek_header(item.payload, source=f"the envelope for site {name}")
        except CryptoError as exc:
            raise FederationError(shorten(str(exc), 600), "invalid_argument") from exc
        got = (shorten(header.federation), header.epoch, header.context_fingerprint, shorten(header.sender),
               shorten(header.recipient))
        want = (self.plan.federation, pub.epoch, pub.fingerprint, site, name)
        if got != want:
            raise FederationError(
                f"the envelope for site {name} says federation/epoch/fingerprint/sender/recipient {got}, the "
                f"publication {want}",
                "invalid_argument",
            )

    def _known_key(self, fingerprint: str) -> KeyEpoch | None:
        return next((k for k in self._keys if k.fingerprint == fingerprint), None)

    def _check_fingerprint(self, fingerprint: str) -> None:
        if self.plan.scheme != "plain" and self._key.epoch == 0:
            raise FederationError(WAITING_FOR_KEY, "failed_precondition")
        if fingerprint == self.fingerprint:
            return
        old = self._known_key(fingerprint)
        if old is not None:
            raise FederationError(
                f"CKKS key epoch {old.epoch} ({old.fingerprint}) was replaced by epoch {self._key.epoch} "
                f"({self._key.fingerprint}) at round {self._key.round}: this ciphertext was made under the old key; "
                "fetch the new key (GetEnvelope) and encrypt again",
                "failed_precondition",
            )
        self._refuse_context(fingerprint)

    def _refuse_context(self, fingerprint: str) -> None:
        """A context this federation never used: another provisioning's, or no CKKS context at all."""
        # echo at most a fingerprint's length: a long value would overflow the status trailer
        shown = fingerprint if len(fingerprint) <= 64 else f"{fingerprint[:64]!r}... ({len(fingerprint)} characters)"
        uses = self.fingerprint or "no key yet (waiting for keys he-init)"
        raise FederationError(
            f"CKKS context mismatch: the request was made under context {shown or '(none)'}, "
            f"this federation uses {uses}; use a key bundle exported from the same "
            "provisioning folder as the server's",
            "invalid_argument",
        )
