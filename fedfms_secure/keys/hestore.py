"""A site's CKKS secret contexts, by key epoch, inside its bundle folder.

When the CKKS secret key is generated at a site (``keys he-init``, ``keys rotate-he``) rather than
by the provisioning host, each site keeps the contexts it generated or opened from an envelope::

    BUNDLE/he/epoch-<n>.ctx   0600  serialized context WITH the secret key of key epoch n
    BUNDLE/he/current.json    0600  {"current": {"epoch", "fingerprint"}, "pending": {...} | null}
    BUNDLE/he/.lock           0600  serialises the site daemon and a key command at the same site
    BUNDLE/he/archive/<time>/       the contexts of an earlier federation run with the same bundle

**At rest.** When the bundle is passphrase-protected (its ``tls.key`` is encrypted, ``keys init
--passphrase-file``) and the store is given that passphrase, each ``epoch-<n>.ctx`` is encrypted:
scrypt (n=2**15, r=8, p=1, 16-byte random salt) derives a 256-bit key from the passphrase, and
AES-256-GCM (random 12-byte nonce) encrypts the context, with the header (magic, version, salt, nonce)
and the file's role (``he/epoch-<n>.ctx``) as associated data: a file moved to another epoch's name,
or any changed byte, is refused. The context is decrypted in memory only. A bundle without a
passphrase keeps plain 0600 files, and a plain file written before keeps being read. Writing into a
protected bundle without its passphrase is refused: no key is written in the clear next to encrypted
ones.

These files are outside the manifest's checksums: they change while the federation runs. A site
holds the current epoch's context and, only while a rotation it started is not yet accepted by the
server, the next one (``pending``); adopting a new epoch deletes every older context. A bundle
provisioned with the CKKS secret (``he_dealer=True``) has no ``he/`` folder: its ``ckks.ctx`` is the
key (``site_key``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenseal as ts
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedfms_secure.keys import pki
from fedfms_secure.keys.pkcs8 import SCRYPT_N, SCRYPT_P, SCRYPT_R  # one KDF cost for every file at rest
from fedfms_secure.he.ckks import context_fingerprint, is_fingerprint, load_context
from fedfms_secure.errors import KeyMaterialError

HE_DIR = "he"
CURRENT_FILE = "current.json"
LOCK_FILE = ".lock"
ARCHIVE_DIR = "archive"
_REFETCH = ("delete the he/ folder of the bundle and start the site again: it fetches its envelope from the "
            "server (or run `fedfms-secure keys he-init` if no site has made the key yet)")

# an encrypted context file: MAGIC | VERSION | salt | nonce | AES-256-GCM(context) (tag included)
MAGIC = b"fedfms-he-ctx\x00"
VERSION = 1
SALT_BYTES = 16
NONCE_BYTES = 12
_HEADER_BYTES = len(MAGIC) + 1 + SALT_BYTES + NONCE_BYTES
_TAG_BYTES = 16


class HePassphraseError(KeyMaterialError):
    """An encrypted context file read without the bundle's passphrase, with a wrong one, or altered."""


@dataclass(frozen=True)
class HeKey:
    """One stored context: its key epoch, its context fingerprint and its file."""

    epoch: int
    fingerprint: str
    path: Path


@dataclass(frozen=True)
class SiteKey:
    """The CKKS context a site encrypts and decrypts with now."""

    context: ts.Context
    fingerprint: str
    epoch: int  # 0: the provisioning host's context (``ckks.ctx`` of a dealer-made bundle)


class HeStore:
    """The ``he/`` folder of one client bundle."""

    def __init__(self, bundle_dir: Path, passphrase: bytes | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.folder = self.bundle_dir / HE_DIR
        self._passphrase = passphrase or None
        self._derived: dict[bytes, bytes] = {}  # salt -> key: one scrypt per file read, not per load

    @property
    def protected(self) -> bool:
        """Whether the bundle is passphrase-protected (its ``tls.key`` is encrypted)."""
        try:
            return pki.is_encrypted_pem((self.bundle_dir / "tls.key").read_bytes())
        except OSError:
            return False

    @property
    def encrypts(self) -> bool:
        """Whether ``put`` writes contexts encrypted (a protected bundle, its passphrase given)."""
        return self._passphrase is not None and self.protected

    def is_encrypted(self, key: HeKey) -> bool:
        """Whether the file of ``key`` is an encrypted context (False when it is plain or missing)."""
        try:
            with open(key.path, "rb") as fh:
                return fh.read(len(MAGIC)) == MAGIC
        except OSError:
            return False

    # --- reading ------------------------------------------------------------------------------
    def current(self) -> HeKey | None:
        """The epoch this site uses, or None before it has any key of its own."""
        return self._entry(self._read().get("current"), "current")

    def pending(self) -> HeKey | None:
        """The next epoch while a rotation this site started awaits the server's acceptance."""
        return self._entry(self._read().get("pending"), "pending")

    def find(self, fingerprint: str) -> HeKey | None:
        """The stored key (current or pending) whose context has ``fingerprint``."""
        for key in (self.current(), self.pending()):
            if key is not None and key.fingerprint == fingerprint:
                return key
        return None

    def load(self, key: HeKey) -> ts.Context:
        """The context of ``key``, checked: private file, secret key present, the recorded fingerprint
        (an encrypted file is decrypted in memory with the store's passphrase; HePassphraseError
        naming the file without it, with a wrong one, or when the file was altered)."""
        return self._checked(key)[0]

    def context_bytes(self, key: HeKey) -> bytes:
        """The serialized context of ``key`` (with the secret key), checked as ``load`` does."""
        return self._checked(key)[1]

    def archived(self) -> frozenset[str]:
        """Fingerprints of the keys put aside by :meth:`archive`: never taken up again."""
        return frozenset(self._read().get("archived") or ())

    def not_before(self) -> dt.datetime | None:
        """After :meth:`archive`: when the newest key set aside was stored. A key sealed before then
        belongs to the earlier run (a replay), and is refused."""
        value = self._read().get("not_before")
        return parse_time(value) if isinstance(value, str) else None

    def stored_at(self, key: HeKey) -> dt.datetime:
        """When this site stored ``key`` (its file's time for a store written by an older version)."""
        for entry in (self._read().get("current"), self._read().get("pending")):
            if isinstance(entry, dict) and entry.get("fingerprint") == key.fingerprint:
                when = parse_time(entry.get("stored")) if isinstance(entry.get("stored"), str) else None
                if when is not None:
                    return when
        try:
            return dt.datetime.fromtimestamp(key.path.stat().st_mtime, dt.timezone.utc)
        except OSError:
            return dt.datetime.now(dt.timezone.utc)

    # --- writing ------------------------------------------------------------------------------
    def archive(self) -> Path | None:
        """Puts the held contexts aside, for a new federation run with the same bundle (a fresh
        server state that has no key epoch yet): they move, unchanged, to ``he/archive/<UTC time>/``,
        and their fingerprints are remembered so that no server can bring them back. Returns that
        folder, or None when there was nothing to put aside."""
        with self._locked():
            state = self._read()
            held = [e for e in (state.get("current"), state.get("pending")) if e]
            if not held:
                return None
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            target = self.folder / ARCHIVE_DIR / stamp
            n = 1
            while target.exists():
                n += 1
                target = self.folder / ARCHIVE_DIR / f"{stamp}-{n}"
            target.mkdir(mode=0o700, parents=True)
            os.chmod(target.parent, 0o700)
            for path in self.folder.glob("epoch-*.ctx"):
                path.rename(target / path.name)
            pki.write_private(target / CURRENT_FILE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
            archived = sorted({*(state.get("archived") or ()), *(e["fingerprint"] for e in held)})
            newest = max(self.stored_at(HeKey(e["epoch"], e["fingerprint"], target / f"epoch-{e['epoch']}.ctx"))
                         for e in held)
            earlier = parse_time(state.get("not_before")) if isinstance(state.get("not_before"), str) else None
            newest = max(newest, earlier) if earlier is not None else newest
            self._write({"current": None, "pending": None, "archived": archived,
                         "not_before": newest.isoformat(timespec="seconds")})
            return target

    def put(self, epoch: int, context_bytes: bytes, *, pending: bool = False) -> HeKey:
        """Stores the context of ``epoch``; as the current key (deleting older ones), or as pending.

        Never goes back: a current key of an older epoch, or another key of the current epoch, is
        refused, and so is a pending key that is not newer than the current one (its file would
        replace the current context)."""
        if not isinstance(epoch, int) or epoch < 1:
            raise KeyMaterialError(f"key epoch {epoch!r} is invalid: epochs count from 1")
        ctx = load_context(context_bytes, source=f"the context of key epoch {epoch}")
        if not ctx.has_secret_key():
            raise KeyMaterialError(f"the context of key epoch {epoch} has no secret key: a site must store the full one")
        key = HeKey(epoch, context_fingerprint(ctx), self.folder / f"epoch-{epoch}.ctx")
        if self.protected and self._passphrase is None:
            raise KeyMaterialError(
                f"{self.bundle_dir / 'tls.key'} is encrypted with a passphrase, so the CKKS key of epoch {epoch} "
                f"would be the only key of this bundle in the clear: pass the bundle's passphrase with "
                "`--passphrase-file`"
            )
        with self._locked():
            state = self._read()
            if key.fingerprint in (state.get("archived") or ()):
                raise KeyMaterialError(
                    f"refusing CKKS key epoch {epoch} ({key.fingerprint[:16]}...): it is a key of an earlier "
                    f"federation run that this site put aside ({self.folder / ARCHIVE_DIR}); a site never takes "
                    "an old key back. Check the server: it announced an old key"
                )
            current = self._entry(state.get("current"), "current")
            if current is not None and (epoch < current.epoch or (epoch == current.epoch and (
                    pending or key.fingerprint != current.fingerprint))):
                raise KeyMaterialError(
                    f"{self.folder} already holds CKKS key epoch {current.epoch} ({current.fingerprint[:16]}...): "
                    f"refusing {'a rotation to ' if pending else ''}epoch {epoch} ({key.fingerprint[:16]}...), a site "
                    "never goes back to an older key or to another key of its epoch. "
                    + ("Another rotation came first: run `fedfms-secure keys rotate-he` again if still wanted"
                       if pending else "Check the server: it announced an old key")
                )
            data = bytes(context_bytes)
            if self.encrypts:
                data = self._encrypt_at_rest(data, epoch)
            pki.write_private(key.path, data)
            entry = {"epoch": epoch, "fingerprint": key.fingerprint, "stored": _now()}
            if pending:
                state["pending"] = entry
            else:
                state["current"] = entry
                if (state.get("pending") or {}).get("epoch", 0) <= epoch:
                    state["pending"] = None
            self._write(state)
            self._prune(state)
        return key

    def promote(self, fingerprint: str) -> HeKey:
        """Makes the pending key with ``fingerprint`` current (the server accepted it); older ones go."""
        with self._locked():
            state = self._read()
            pending = self._entry(state.get("pending"), "pending")
            current = self._entry(state.get("current"), "current")
            if current is not None and current.fingerprint == fingerprint:
                return current  # promoted already (by the site daemon or an earlier call)
            if pending is None or pending.fingerprint != fingerprint:
                raise KeyMaterialError(
                    f"{self.folder / CURRENT_FILE} holds no pending key {fingerprint[:16]}...: it was discarded or "
                    f"never stored; {_REFETCH}"
                )
            state["current"], state["pending"] = state["pending"], None
            self._write(state)
            self._prune(state)
            return pending

    def discard_pending(self) -> None:
        """Forgets a rotation the server did not accept: deletes its context."""
        with self._locked():
            state = self._read()
            if state.get("pending"):
                state["pending"] = None
                self._write(state)
                self._prune(state)

    # --- internals ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(mode=0o700, exist_ok=True)
        # 0600 like everything in he/ (``keys verify`` holds the folder's files private)
        fd = os.open(self.folder / LOCK_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        file = self.folder / CURRENT_FILE
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            return {"current": None, "pending": None}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise KeyMaterialError(f"{file} is unreadable or not JSON ({exc}); {_REFETCH}") from None
        if not isinstance(data, dict):
            raise KeyMaterialError(f"{file} holds no JSON object; {_REFETCH}")
        return data

    def _write(self, state: dict[str, Any]) -> None:
        pki.write_private(self.folder / CURRENT_FILE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())

    def _entry(self, entry: Any, slot: str) -> HeKey | None:
        if entry is None:
            return None
        file = self.folder / CURRENT_FILE
        if (not isinstance(entry, dict) or not isinstance(entry.get("epoch"), int) or isinstance(entry.get("epoch"), bool)
                or entry["epoch"] < 1 or not is_fingerprint(entry.get("fingerprint"))):
            raise KeyMaterialError(f"{file}: the {slot} entry {entry!r} is not an epoch and a fingerprint; {_REFETCH}")
        return HeKey(entry["epoch"], entry["fingerprint"], self.folder / f"epoch-{entry['epoch']}.ctx")

    def _checked(self, key: HeKey) -> tuple[ts.Context, bytes]:
        try:
            mode = stat.S_IMODE(key.path.stat().st_mode)
            data = key.path.read_bytes()
        except FileNotFoundError:
            raise KeyMaterialError(f"{key.path} (key epoch {key.epoch}) is missing; {_REFETCH}") from None
        if mode & 0o077:
            raise KeyMaterialError(f"{key.path} holds the CKKS secret key but is readable by others (mode {mode:o}); "
                                   f"run `chmod 600 {key.path}`")
        if data.startswith(MAGIC):
            data = self._decrypt_at_rest(data, key)
        ctx = load_context(data, source=str(key.path))
        if not ctx.has_secret_key():
            raise KeyMaterialError(f"{key.path} has no CKKS secret key; {_REFETCH}")
        actual = context_fingerprint(ctx)
        if actual != key.fingerprint:
            raise KeyMaterialError(
                f"{key.path} has fingerprint {actual[:16]}..., {self.folder / CURRENT_FILE} says "
                f"{key.fingerprint[:16]}... for epoch {key.epoch}: the file was replaced; {_REFETCH}"
            )
        return ctx, data

    def _key_for(self, salt: bytes) -> bytes:
        """The AES-256 key that scrypt derives from the passphrase and ``salt`` (derived once per salt)."""
        if salt not in self._derived:
            kdf = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
            self._derived[salt] = kdf.derive(self._passphrase or b"")
        return self._derived[salt]

    def _encrypt_at_rest(self, context: bytes, epoch: int) -> bytes:
        """``context`` encrypted with the passphrase, bound to the file of ``epoch``."""
        salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
        header = MAGIC + bytes([VERSION]) + salt + nonce
        return header + AESGCM(self._key_for(salt)).encrypt(nonce, context, _bound(header, epoch))

    def _decrypt_at_rest(self, blob: bytes, key: HeKey) -> bytes:
        """The context in the encrypted file of ``key``, decrypted in memory."""
        if len(blob) < _HEADER_BYTES + _TAG_BYTES:
            raise KeyMaterialError(f"{key.path} is a truncated encrypted CKKS context; {_REFETCH}")
        version = blob[len(MAGIC)]
        if version != VERSION:
            raise KeyMaterialError(
                f"{key.path} is an encrypted CKKS context of format version {version}, this build reads version "
                f"{VERSION}: upgrade fedfms-secure, or {_REFETCH}"
            )
        if self._passphrase is None:
            raise HePassphraseError(
                f"{key.path} (CKKS key epoch {key.epoch}) is encrypted with the bundle's passphrase: pass it with "
                "`--passphrase-file`"
            )
        salt = blob[len(MAGIC) + 1:len(MAGIC) + 1 + SALT_BYTES]
        nonce = blob[len(MAGIC) + 1 + SALT_BYTES:_HEADER_BYTES]
        try:
            return AESGCM(self._key_for(salt)).decrypt(nonce, blob[_HEADER_BYTES:], _bound(blob[:_HEADER_BYTES],
                                                                                            key.epoch))
        except InvalidTag:
            raise HePassphraseError(
                f"{key.path} (CKKS key epoch {key.epoch}) cannot be decrypted: the passphrase is wrong, or the file "
                "was altered or renamed. Pass the bundle's passphrase with `--passphrase-file`; if it is the right "
                f"one, the file is damaged: {_REFETCH}"
            ) from None

    def _prune(self, state: dict[str, Any]) -> None:
        """Deletes every context that is neither current nor pending."""
        keep = {f"epoch-{e['epoch']}.ctx" for e in (state.get("current"), state.get("pending")) if e}
        for path in self.folder.glob("epoch-*.ctx"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def parse_time(value: str | None) -> dt.datetime | None:
    """An ISO time (as ``_now`` and the envelopes' ``created`` write it), or None if it is not one."""
    try:
        when = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def _bound(header: bytes, epoch: int) -> bytes:
    """The associated data of an encrypted context: its header and the file's role (its epoch)."""
    return header + f"|{HE_DIR}/epoch-{epoch}.ctx".encode()


def site_key(bundle: Any, store: HeStore | None = None, *, passphrase: bytes | None = None) -> SiteKey | None:
    """The context ``bundle``'s site uses now: its ``he/`` current epoch, else (a bundle made with the
    CKKS secret by the provisioning host) its ``ckks.ctx``; None when the site waits for its envelope.
    ``passphrase`` (when no ``store`` is given) opens contexts encrypted at rest."""
    store = store or HeStore(bundle.path, passphrase=passphrase)
    current = store.current()
    if current is not None:
        return SiteKey(store.load(current), current.fingerprint, current.epoch)
    if getattr(bundle, "has_he_secret", True):
        return SiteKey(bundle.context(), bundle.fingerprint, 0)
    return None

