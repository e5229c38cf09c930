"""A site's side of the CKKS key's life: make it (he-init), receive it, replace it (rotate-he).

The CKKS secret key is generated at a site, never at the provisioning host or the server::

    he-init   (one site, once)  new context with the manifest's parameters -> BUNDLE/he/ (epoch 1)
                                seal it to every other site -> PublishKeys(epoch 1, envelopes)
    a site without the key      GetEnvelope (NOT_FOUND until he-init ran: wait with backoff)
                                open and verify it (``envelope.open_envelope``) -> BUNDLE/he/
    rotate-he (a site with the current key e, at a round boundary of round r)
                                download E_e(global state of r), decrypt, new context, encrypt
                                the state under it, seal it to the active sites ->
                                PublishKeys(epoch e+1, round r, envelopes, state chunks)

A site never goes back to an older key epoch (``current_key`` refuses a rollback the server might
announce), except into a new federation run with the same bundle: a server without any key (a new
``--state``), or a key whose signed envelope was sealed after this site stored its own, makes the
site set its keys aside (``he/archive/``, kept, never taken back) and take the new run's key.
A site also refuses an envelope from a site that the revocation list in its bundle
(``BUNDLE/crl.pem``) removed. The server accepts a new epoch only at a round boundary (round r open, no commit yet)
and then refuses ciphertexts of the old one; ``rotate_key`` retries until a boundary comes or its wait
ends. Every other site notices the new epoch (Join, GetStatus, or a refused commit), fetches its
envelope and goes on with the new key: a site that had already trained in round r under the old
key still holds a valid plaintext update and only encrypts it again.

Each function takes a connected ``FederationClient`` and a loaded client ``Bundle``; the
``keys he-init``/``keys rotate-he`` commands and the site daemon are thin layers over them. In a
passphrase-protected bundle, ``passphrase`` (the bundle's) encrypts the contexts kept in ``he/``
(``crypto/hestore.py``) and opens them again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import CRL, Bundle, sealing_keys
from fedfms_secure.he.ckks import new_secret_context, serialize_site_context
from fedfms_secure.he.codec import UpdateCodec, make_site_codec
from fedfms_secure.keys.envelope import OpenedEnvelope, open_envelope, seal_for_sites
from fedfms_secure.keys.hestore import HeStore, SiteKey, parse_time, site_key
from fedfms_secure.he.rekey import reencrypt_chunks
from fedfms_secure.errors import ConfigError, FederationError, KeyMaterialError
from fedfms_secure.protocol import PHASE_COMMIT, KeyEpoch, KeyPublication, Status
from fedfms_secure.transport.client import FederationClient

log = logging.getLogger("fedfms_secure.site")


@dataclass(frozen=True)
class Published:
    """What ``init_key`` / ``rotate_key`` did: the epoch now in use and who got an envelope."""

    key: KeyEpoch
    recipients: tuple[str, ...]
    skipped: tuple[str, ...]  # sites of the federation that got none (no envelope key, retired or revoked)
    state_chunks: int
    attempts: int


def init_key(client: FederationClient, bundle: Bundle, store: HeStore | None = None, *,
             passphrase: bytes | None = None) -> Published:
    """``keys he-init``: make the federation's first CKKS key here and publish it as epoch 1."""
    store = store or HeStore(bundle.path, passphrase=passphrase)
    if bundle.has_he_secret:
        raise ConfigError(
            f"{bundle.path} holds the CKKS key made by the provisioning host (ckks.ctx): this federation has its "
            "key already; to replace it use `fedfms-secure keys rotate-he`"
        )
    status = client.status()
    set_aside_earlier_run(store, status.key)
    current = store.current()
    if current is not None:
        raise ConfigError(
            f"this site already holds CKKS key epoch {current.epoch} ({store.folder}); he-init makes the first key "
            "only: to replace it use `fedfms-secure keys rotate-he`"
        )
    if status.key.epoch:
        raise ConfigError(
            f"the federation already has CKKS key epoch {status.key.epoch} (made by "
            f"{status.key.site or 'the provisioning host'}): start this site's daemon, which fetches its envelope; "
            "to replace the key use `fedfms-secure keys rotate-he`"
        )
    context = serialize_site_context(new_secret_context(bundle.params))
    envelopes, recipients, skipped = _seal(bundle, context, 1, status)
    pending = store.put(1, context, pending=True)
    publication = KeyPublication(1, pending.fingerprint, status.round, "", len(envelopes), 0)
    try:
        ack = client.publish_keys(publication, envelopes)
    except FederationError:
        if client.status().key.fingerprint != pending.fingerprint:  # not a lost reply after success
            store.discard_pending()
            raise
        ack_key = client.status().key
    else:
        ack_key = ack.key
    store.promote(pending.fingerprint)
    log.info("CKKS key epoch 1 made here and sealed to the other sites",
             extra={"fingerprint": pending.fingerprint[:16], "recipients": ",".join(recipients)})
    return Published(ack_key, recipients, skipped, 0, 1)


def rotate_key(
    client: FederationClient,
    bundle: Bundle,
    envelope_key: X25519PrivateKey | None = None,
    *,
    wait: float = 300.0,
    poll_interval: float = 0.1,
    store: HeStore | None = None,
    crl_pem: bytes | None = None,
    passphrase: bytes | None = None,
) -> Published:
    """``keys rotate-he``: replace the current key by a new one made here, at the next round boundary.

    Retries for up to ``wait`` seconds while the open round already has commits. ``envelope_key``
    lets this site first fetch the current key if it does not hold it yet. Sites the server reports
    as retired get no envelope, and neither does any site that ``crl_pem`` (the federation CA's
    revocation list, ``ca/crl.pem``) removes: the CA signs that list, so a server that hides a
    revocation cannot get the new key sealed to a revoked site. ``passphrase`` (without ``store``)
    keeps the contexts encrypted in a passphrase-protected bundle.
    """
    store = store or HeStore(bundle.path, passphrase=passphrase)
    status = client.status()
    if not status.key.epoch:
        raise ConfigError("the federation has no CKKS key yet: make the first one with `fedfms-secure keys he-init`")
    key = current_key(client, bundle, envelope_key, status.key, store=store, timeout=min(wait, 60.0))
    old_codec = make_site_codec("ckks", key.context, key.fingerprint, params=bundle.params)
    context = serialize_site_context(new_secret_context(bundle.params))
    epoch = status.key.epoch + 1
    envelopes, recipients, skipped = _seal(bundle, context, epoch, status, removed_sites(bundle, crl_pem))
    pending = store.put(epoch, context, pending=True)
    new_fingerprint = pending.fingerprint
    new_codec = make_site_codec("ckks", store.load(pending), new_fingerprint, params=bundle.params)
    deadline = time.monotonic() + wait
    attempts, chunks, last = 0, 0, "no round boundary seen yet"
    try:
        while True:
            status = client.status()
            if status.key.fingerprint == new_fingerprint:  # accepted; only the reply was lost
                break
            if status.key.fingerprint != key.fingerprint:
                raise FederationError(
                    f"key epoch {status.key.epoch} ({status.key.fingerprint[:16]}..., made by {status.key.site}) replaced "
                    f"epoch {epoch - 1} while this rotation waited: run `keys rotate-he` again if still wanted",
                    "failed_precondition",
                )
            if status.done:
                raise FederationError(f"the federation has finished all {status.total_rounds} rounds: nothing to "
                                      "rotate", "failed_precondition")
            if status.phase == PHASE_COMMIT and not any(s.committed for s in status.sites):
                attempts += 1
                try:
                    chunks = _publish_rotation(client, status, epoch, key, old_codec, new_codec, envelopes)
                    break
                except FederationError as exc:
                    if exc.code not in ("failed_precondition", "not_found", "unavailable"):
                        raise
                    last = str(exc)
                    log.info("round boundary missed; retrying", extra={"round": status.round, "reason": last})
            if time.monotonic() > deadline:
                raise FederationError(
                    f"no round boundary within --wait {wait:g} s (a new key takes effect only before the first commit of "
                    f"a round; last refusal: {last}); run it again with a longer --wait",
                    "unavailable",
                )
            time.sleep(poll_interval)
    except BaseException:
        if client_key_is(client, new_fingerprint):
            store.promote(new_fingerprint)
        else:
            store.discard_pending()
        raise
    store.promote(new_fingerprint)
    final = client.status().key
    log.info("CKKS key rotated", extra={"epoch": final.epoch, "round": final.round, "fingerprint": new_fingerprint[:16],
                                        "recipients": ",".join(recipients)})
    return Published(final, recipients, skipped, chunks, attempts)


def current_key(
    client: FederationClient,
    bundle: Bundle,
    envelope_key: X25519PrivateKey | None,
    announced: KeyEpoch,
    *,
    store: HeStore | None = None,
    timeout: float = 0.0,
    interval: float = 0.5,
    passphrase: bytes | None = None,
) -> SiteKey:
    """This site's context for the ``announced`` key epoch: the stored one, else its envelope,
    fetched (with backoff for up to ``timeout`` seconds while the server has none yet), opened,
    verified and stored. Older contexts are deleted once the new one is stored. ``passphrase``
    (without ``store``) opens and writes contexts encrypted at rest."""
    store = store or HeStore(bundle.path, passphrase=passphrase)
    deadline = time.monotonic() + timeout
    delay = interval
    said = Reminder(60.0)
    while True:
        if announced.epoch:
            held = _held(bundle, store, announced)
            if held is not None:
                return held
            if envelope_key is not None and _older_than_held(store, announced):
                newer = _later_run(client, bundle, store, envelope_key, announced)
                if newer is not None:
                    return newer
            _refuse_rollback(store, announced)
            if envelope_key is None:
                raise KeyMaterialError(
                    f"this site does not hold CKKS key epoch {announced.epoch} ({announced.fingerprint[:16]}...) and "
                    "no envelope key was given to fetch it: start the site daemon first"
                )
            try:
                envelope = client.envelope(announced.epoch)
            except FederationError as exc:
                if exc.code != "not_found" or time.monotonic() + delay > deadline:
                    raise
                if said("envelope"):
                    log.info("waiting for this site's envelope", extra={"epoch": announced.epoch, "reason": str(exc)})
            else:
                return _adopt(bundle, store, envelope_key, envelope.payload, envelope.key)
        elif time.monotonic() + delay > deadline:
            raise FederationError(
                f"no CKKS key after {timeout:.0f} s: the federation is waiting for keys he-init at one site "
                "(`fedfms-secure keys he-init --keys SITE_BUNDLE --server HOST:PORT`)",
                "unavailable",
            )
        elif said("he-init"):
            log.info(f"waiting for keys he-init at one site (gives up after {timeout:g} s)",
                     extra={"again_in_seconds": said.every})
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
        announced = client.status().key


def set_aside_earlier_run(store: HeStore, announced: KeyEpoch) -> Path | None:
    """A server without any key epoch (a new ``--state``) while this site holds keys: they belong to an
    earlier federation run with the same bundle. They are moved, unchanged, to ``he/archive/`` (and
    never taken back), so that ``keys he-init`` and the site daemon start the new run; returns the
    archive folder, or None when nothing was set aside."""
    if announced.epoch:
        return None
    held = store.current() or store.pending()
    if held is None:
        return None
    folder = store.archive()
    log.warning("the server has no CKKS key yet (a new federation run): this site's keys of an earlier run are "
                "set aside, not deleted", extra={"epoch": held.epoch, "fingerprint": held.fingerprint[:16],
                                                 "archive": str(folder)})
    return folder


class Reminder:
    """Says whether a waiting message is due: the first time for each ``topic``, then every ``every`` s."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def __call__(self, topic: str) -> bool:
        now = time.monotonic()
        if topic in self._last and now - self._last[topic] < self.every:
            return False
        self._last[topic] = now
        return True


def client_key_is(client: FederationClient, fingerprint: str) -> bool:
    """Whether the server's current key is ``fingerprint`` (False when it cannot be asked)."""
    try:
        return client.status().key.fingerprint == fingerprint
    except FederationError:
        return False


# --- internals ------------------------------------------------------------------------------------
def _held(bundle: Bundle, store: HeStore, announced: KeyEpoch) -> SiteKey | None:
    stored = store.find(announced.fingerprint)
    if stored is not None:
        if store.current() != stored:  # a rotation this site made, accepted but not yet promoted
            store.promote(stored.fingerprint)
        return SiteKey(store.load(stored), stored.fingerprint, stored.epoch)
    held = site_key(bundle, store)
    if held is not None and held.fingerprint == announced.fingerprint:
        return SiteKey(held.context, held.fingerprint, announced.epoch)
    return None


def _refuse_rollback(store: HeStore, announced: KeyEpoch) -> None:
    """A site never goes back to an older key epoch, nor to another key of its own epoch: a server
    that replays an old (validly signed) envelope would otherwise make it encrypt under a key that
    a revoked site still holds."""
    current = store.current()
    if current is not None and announced.epoch <= current.epoch:
        raise KeyMaterialError(
            f"the server announces CKKS key epoch {announced.epoch} ({announced.fingerprint[:16]}...), but this site "
            f"already holds epoch {current.epoch} ({current.fingerprint[:16]}...): a site never goes back to an older "
            "key or to another key of the same epoch. Check the server (a replayed key would expose this site's "
            f"updates); only if the federation was started over on purpose, delete {store.folder}"
        )


def _older_than_held(store: HeStore, announced: KeyEpoch) -> bool:
    current = store.current()
    return current is not None and announced.epoch <= current.epoch and announced.fingerprint != current.fingerprint


def _later_run(client: FederationClient, bundle: Bundle, store: HeStore, envelope_key: X25519PrivateKey,
               announced: KeyEpoch) -> SiteKey | None:
    """The announced key when it belongs to a new federation run with this bundle, else None.

    A key of an epoch this site already passed is a rollback, unless its envelope (signed by a
    site of the federation, ``created`` included) was sealed after this site stored its current
    key: then a site made it for a new run (a new server ``--state``), and no replayed old envelope
    can be that recent. The keys held here are set aside (``HeStore.archive``), not deleted."""
    current = store.current()
    assert current is not None
    try:
        envelope = client.envelope(announced.epoch)
    except FederationError:
        return None
    opened = _open(bundle, envelope_key, envelope.payload, envelope.key)
    created = parse_time(opened.header.created)
    if created is None or created <= store.stored_at(current):
        return None
    folder = store.archive()
    log.warning("a key sealed after this site's own, for an epoch it already passed: a new federation run with "
                "this bundle; the keys of the earlier run are set aside, not deleted",
                extra={"epoch": announced.epoch, "from": opened.header.sender, "archive": str(folder)})
    return _store_opened(store, opened, announced)


def _open(bundle: Bundle, envelope_key: X25519PrivateKey, payload: bytes, key: KeyEpoch) -> OpenedEnvelope:
    return open_envelope(
        payload, recipient=bundle.name, recipient_key=envelope_key, federation=bundle.federation,
        sites=bundle.clients, ca_pem=bundle.ca_pem, params=bundle.params, epoch=key.epoch,
        fingerprint=key.fingerprint, source=f"the envelope of key epoch {key.epoch}",
        revoked_sites=bundle_removed_sites(bundle),
    )


def _store_opened(store: HeStore, opened: OpenedEnvelope, key: KeyEpoch) -> SiteKey:
    not_before = store.not_before()
    created = parse_time(opened.header.created)
    if not_before is not None and (created is None or created <= not_before):
        raise KeyMaterialError(
            f"the envelope of CKKS key epoch {key.epoch} from {opened.header.sender} was sealed at "
            f"{opened.header.created}, before this site's keys of an earlier run were stored "
            f"({not_before.isoformat(timespec='seconds')}): a replayed old key, refused. Check the server"
        )
    stored = store.put(key.epoch, opened.context_bytes)
    log.info("CKKS key received", extra={"epoch": key.epoch, "from": opened.header.sender,
                                         "fingerprint": key.fingerprint[:16]})
    return SiteKey(store.load(stored), stored.fingerprint, stored.epoch)


def _adopt(bundle: Bundle, store: HeStore, envelope_key: X25519PrivateKey, payload: bytes, key: KeyEpoch) -> SiteKey:
    return _store_opened(store, _open(bundle, envelope_key, payload, key), key)


def removed_sites(bundle: Bundle, crl_pem: bytes | None) -> set[str]:
    """The sites that the CA-signed revocation list ``crl_pem`` removes from the federation."""
    if crl_pem is None:
        return set()
    ca = pki.cert_from_pem(bundle.ca_pem, source=str(bundle.path / "ca.crt"))
    crl = pki.crl_from_pem(crl_pem, ca, source="the revocation list given with --crl")
    return {r.site for r in pki.revocations_of(crl).values() if r.removes_site}


def bundle_removed_sites(bundle: Bundle) -> set[str]:
    """The sites removed by the revocation list in the site's own bundle (``BUNDLE/crl.pem``, put
    there by ``keys export client ... --update`` after a ``keys revoke``); none without one. A
    list not signed by the bundle's CA is an error naming the file, not an empty list."""
    file = bundle.path / CRL
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {file} ({exc.strerror}); export the bundle again with "
                               f"`fedfms-secure keys export client {bundle.name} --update`") from None
    ca = pki.cert_from_pem(bundle.ca_pem, source=str(bundle.path / "ca.crt"))
    crl = pki.crl_from_pem(data, ca, source=str(file))
    return {r.site for r in pki.revocations_of(crl).values() if r.removes_site}


def _seal(bundle: Bundle, context: bytes, epoch: int, status: Status, removed: set[str] = frozenset()
          ) -> tuple[dict[str, bytes], tuple[str, ...], tuple[str, ...]]:
    """Envelopes for the federation's active sites that this bundle knows a CA-certified envelope key
    of (none for a site that ``removed`` or the bundle's own revocation list names)."""
    active = {s.name for s in status.sites if not s.retired} - set(removed) - bundle_removed_sites(bundle)
    recipients = sealing_keys(bundle, active)  # each checked against its CA-signed certificate, now
    skipped = tuple(sorted({s.name for s in status.sites} - set(recipients) - {bundle.name}))
    sender_key = pki.private_key_from_pem(bundle.key_pem, source=str(bundle.path / "tls.key"))
    envelopes = seal_for_sites(context, federation=bundle.federation, epoch=epoch, params=bundle.params,
                               sender=bundle.name, sender_key=sender_key, sender_cert_pem=bundle.cert_pem,
                               recipients=recipients)
    return envelopes, tuple(sorted(envelopes)), skipped


def _publish_rotation(client: FederationClient, status: Status, epoch: int, key: SiteKey, old_codec: UpdateCodec,
                      new_codec: UpdateCodec, envelopes: dict[str, bytes]) -> int:
    """One attempt: the state that opens the current round, re-encrypted, with the envelopes."""
    round_ = status.round
    chunks = client.global_state(round_) if round_ > 0 else []
    state = reencrypt_chunks(old_codec, new_codec, chunks)
    publication = KeyPublication(epoch, new_codec.fingerprint, round_, key.fingerprint, len(envelopes), len(state))
    client.publish_keys(publication, envelopes, lambda: state)
    return len(state)


class Keyring:
    """The site daemon's CKKS key: the codec of the current epoch, switched when the server
    announces a new one (the context read from ``he/`` or fetched in an envelope)."""

    def __init__(self, client: FederationClient, bundle: Bundle, *, passphrase: bytes | None = None,
                 timeout: float = 300.0) -> None:
        self._client = client
        self._bundle = bundle
        self._passphrase = passphrase
        self._timeout = timeout
        self._store = HeStore(bundle.path, passphrase=passphrase)
        self._envelope_key: X25519PrivateKey | None = None
        held = site_key(bundle, self._store)
        self.codec: UpdateCodec | None = (
            make_site_codec("ckks", held.context, held.fingerprint, params=bundle.params) if held else None
        )

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the key held now ("" before this site has any)."""
        return self.codec.fingerprint if self.codec is not None else ""

    def start_run(self, announced: KeyEpoch) -> None:
        """Before joining: sets aside the keys of an earlier federation run when the server has none
        yet (``set_aside_earlier_run``), so the site waits for this run's he-init instead."""
        if set_aside_earlier_run(self._store, announced) is not None:
            self.codec = None

    def sync(self, announced: KeyEpoch) -> bool:
        """Switches to the ``announced`` key epoch unless it is held already; True when it switched.

        Before the first key exists it waits (with backoff, up to the timeout) for he-init.
        """
        if self.codec is not None and announced.epoch and announced.fingerprint == self.codec.fingerprint:
            return False
        if self._envelope_key is None:
            from fedfms_secure.keys.bundle import load_envelope_key

            self._envelope_key = load_envelope_key(self._bundle.path, passphrase=self._passphrase)
        key = current_key(self._client, self._bundle, self._envelope_key, announced, store=self._store,
                          timeout=self._timeout)
        previous = self.fingerprint
        self.codec = make_site_codec("ckks", key.context, key.fingerprint, params=self._bundle.params)
        log.info("using CKKS key epoch", extra={"epoch": key.epoch, "fingerprint": key.fingerprint[:16],
                                                "previous": previous[:16] or "none"})
        return previous != key.fingerprint
