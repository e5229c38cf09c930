"""A site's CKKS secret contexts, by key epoch, inside its bundle folder.

When the CKKS secret key is generated at a site (``keys he-init``, ``keys rotate-he``) rather than
by the provisioning host, each site keeps the contexts it generated or opened from an envelope::

    BUNDLE/he/epoch-<n>.ctx   0600  serialized context WITH the secret key of key epoch n
    BUNDLE/he/current.json    0600  {"current": {"epoch", "fingerprint"}, "pending": {...} | null}
    BUNDLE/he/.lock           0600  serialises the site daemon and a key command at the same site

These files are outside the manifest's checksums: they change while the federation runs. A site
holds the current epoch's context and, only while a rotation it started is not yet accepted by the
server, the next one (``pending``); adopting a new epoch deletes every older context. A bundle
provisioned with the CKKS secret (``he_dealer=True``) has no ``he/`` folder: its ``ckks.ctx`` is the
key (``site_key``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenseal as ts

from fedfms_secure.crypto import pki
from fedfms_secure.crypto.ckks import context_fingerprint, is_fingerprint, load_context
from fedfms_secure.errors import KeyMaterialError

HE_DIR = "he"
CURRENT_FILE = "current.json"
LOCK_FILE = ".lock"
_REFETCH = ("delete the he/ folder of the bundle and start the site again: it fetches its envelope from the "
            "server (or run `fedfms-secure keys he-init` if no site has made the key yet)")


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

    def __init__(self, bundle_dir: Path) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.folder = self.bundle_dir / HE_DIR

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
        """The context of ``key``, checked: private file, secret key present, the recorded fingerprint."""
        return self._checked(key)[0]

    def context_bytes(self, key: HeKey) -> bytes:
        """The serialized context of ``key`` (with the secret key), checked as ``load`` does."""
        return self._checked(key)[1]

    # --- writing ------------------------------------------------------------------------------
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
        with self._locked():
            state = self._read()
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
            pki.write_private(key.path, bytes(context_bytes))
            entry = {"epoch": epoch, "fingerprint": key.fingerprint}
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

    def _prune(self, state: dict[str, Any]) -> None:
        """Deletes every context that is neither current nor pending."""
        keep = {f"epoch-{e['epoch']}.ctx" for e in (state.get("current"), state.get("pending")) if e}
        for path in self.folder.glob("epoch-*.ctx"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def site_key(bundle: Any, store: HeStore | None = None) -> SiteKey | None:
    """The context ``bundle``'s site uses now: its ``he/`` current epoch, else (a bundle made with the
    CKKS secret by the provisioning host) its ``ckks.ctx``; None when the site waits for its envelope."""
    store = store or HeStore(bundle.path)
    current = store.current()
    if current is not None:
        return SiteKey(store.load(current), current.fingerprint, current.epoch)
    if getattr(bundle, "has_he_secret", True):
        return SiteKey(bundle.context(), bundle.fingerprint, 0)
    return None

