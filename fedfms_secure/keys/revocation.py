"""Certificate revocation on the server: the CA-signed CRL of the server bundle, checked on every call.

``RevocationList(crl_path, ca_pem)`` reads ``crl.pem`` (written by ``fedfms-secure keys revoke``
and ``keys rotate-tls``, copied into the server bundle by ``--server-bundle`` or ``keys export
server``) and reloads it whenever the file changes, so a running server refuses a revoked
certificate from the next call on. The list is trusted by its CA signature only (it is not in
the manifest's checksums). A reloaded list that is unreadable, not signed by the federation's
CA, or older (a lower CRL number) than the one in use is ignored with an error in the log: the
server keeps refusing what it refused before. Deleting the file does not un-revoke anything
either.

With ``persist`` (the daemon gives ``revocations.json`` in its ``--state`` folder) the list also
outlives the file: the highest CRL number seen and every revoked serial (site, date, reason) are
written there atomically whenever they grow, and read back at start. The revocations in force are
always the union of that record and every CA-signed ``crl.pem`` loaded since, so a server
restarted from a bundle whose ``crl.pem`` was deleted, or replaced by an older signed list, still
refuses every certificate it ever saw revoked (a missing file at start is logged as a warning).

``fedfms_secure.server.interceptors.RevocationInterceptor`` runs ``check_pem`` on every call of
the gRPC server: a revoked certificate is aborted with ``PERMISSION_DENIED`` and a message naming
the site, the serial, the date and reason of the revocation, and what to do.

gRPC's TLS handshake itself does not consult the CRL (grpcio has no CRL option for Python
servers), so a revoked site still completes the handshake and is refused at its first call.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path

from cryptography import x509

from fedfms_secure.atomic import write_atomic
from fedfms_secure.keys import pki
from fedfms_secure.errors import ConfigError, FederationError, KeyMaterialError

log = logging.getLogger("fedfms_secure.server")

#: the file in the server's ``--state`` folder that keeps every revocation the server has seen
PERSISTED = "revocations.json"


class RevocationList:
    """The revoked serials of the federation's CA, reloaded when ``crl_path`` changes; thread-safe.

    ``persist``: a JSON file (in the server's state folder) that keeps the highest CRL number and
    every revocation seen, across restarts; None keeps them in memory only.
    """

    def __init__(self, crl_path: Path, ca_pem: bytes, *, persist: Path | None = None) -> None:
        self.path = Path(crl_path)
        self.persist = Path(persist) if persist is not None else None
        self._ca = pki.cert_from_pem(ca_pem, source="the bundle's ca.crt")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._number = -1
        self._entries: dict[int, pki.Revocation] = {}
        self._certs: dict[bytes, x509.Certificate] = {}
        self._saved: tuple[int, frozenset[int]] = (-1, frozenset())
        if self.persist is not None and self.persist.exists():
            self._number, self._entries = _read_persisted(self.persist)
            self._saved = (self._number, frozenset(self._entries))
        if self.path.exists():
            # at start a broken list is an error the operator must fix, not something to ignore
            self._load(strict=True)
        elif self._entries or self._number >= 0:
            log.warning("the bundle has no revocation list; still refusing the revocations recorded in the "
                        "server's state (copy ca/crl.pem into the bundle again with `keys export server --update`)",
                        extra={"crl": str(self.path), "record": str(self.persist), "number": self._number,
                               "revoked": len(self._entries)})
        self._save(strict=True)

    @property
    def number(self) -> int:
        """The CRL number in use (-1: no list yet)."""
        return self._number

    def refresh(self) -> bool:
        """Reload the list if its file changed; True when a new list was loaded."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None:
                log.error("the revocation list disappeared; still refusing what it revoked",
                          extra={"crl": str(self.path)})
                self._stamp = None
            return False
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            return self._load(strict=False, stamp=stamp)

    def _load(self, *, strict: bool, stamp: tuple[int, int, int] | None = None) -> bool:
        try:
            if stamp is None:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            crl = pki.crl_from_pem(self.path.read_bytes(), self._ca, source=str(self.path))
        except (KeyMaterialError, OSError) as exc:
            if strict:
                raise KeyMaterialError(str(exc)) from None
            log.error("ignoring an unusable revocation list; the previous one stays in force",
                      extra={"crl": str(self.path), "error": str(exc)})
            self._stamp = stamp
            return False
        self._stamp = stamp
        number = pki.crl_number(crl)
        entries = pki.revocations_of(crl)
        if number < self._number:
            log.error("ignoring an older revocation list (lower CRL number); the newer one stays in force",
                      extra={"crl": str(self.path), "number": number, "in_force": self._number})
            # still signed by the CA: whatever it revokes stays revoked, nothing it lacks comes back
            added = {k: v for k, v in entries.items() if k not in self._entries}
            if added:
                self._entries = {**self._entries, **added}
                self._save(strict=strict)
            return False
        # a newer list never drops an entry: revocation is permanent (the list in force replaces an
        # entry's details only when it names the same serial)
        self._entries = {**self._entries, **entries}
        self._number = number
        log.info("revocation list loaded", extra={"crl": str(self.path), "number": number, "revoked": len(entries)})
        self._save(strict=strict)
        return True

    def _save(self, *, strict: bool) -> None:
        """Writes the record to ``persist`` when it grew (atomically); at start a failure is an error."""
        if self.persist is None:
            return
        current = (self._number, frozenset(self._entries))
        if current == self._saved:
            return
        try:
            _write_persisted(self.persist, self._number, self._entries)
        except OSError as exc:
            message = (f"cannot write the revocation record {self.persist} ({exc.strerror or exc}); check the "
                       "state folder's free space and permissions")
            if strict:
                raise ConfigError(message) from None
            log.error(message + "; the revocations stay in force while the server runs",
                      extra={"record": str(self.persist)})
            return
        self._saved = current

    def revoked(self, serial: int) -> pki.Revocation | None:
        """The revocation of ``serial``, or None."""
        return self._entries.get(serial)

    def removed_sites(self) -> dict[str, pki.Revocation]:
        """Sites taken out of the federation (``keys revoke``), by name."""
        return {r.site: r for r in self._entries.values() if r.removes_site}

    def check_pem(self, cert_pem: bytes) -> None:
        """FederationError ``permission_denied`` when the certificate in ``cert_pem`` is revoked."""
        self.refresh()
        cert = self._certs.get(cert_pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(cert_pem)
            if len(self._certs) > 1024:
                self._certs.clear()
            self._certs[cert_pem] = cert
        entry = self._entries.get(cert.serial_number)
        if entry is None:
            return
        site = pki.common_name(cert) or entry.site or "?"
        if entry.reason == "superseded" and not entry.removes_site:
            todo = ("this certificate was replaced by `keys rotate-tls`: the operator exports the site's new bundle "
                    f"(`fedfms-secure keys export client {site} --from DIR --out BUNDLE --update`); install it "
                    "and restart the site")
        else:
            todo = ("the site is no longer part of the federation; if that is a mistake, the operator adds it again "
                    "under a new name with `fedfms-secure keys add-client`")
        raise FederationError(
            f"certificate of site {site!r} (serial {cert.serial_number:x}) was revoked on "
            f"{entry.date:%Y-%m-%d %H:%M} UTC, reason: {entry.reason}; {todo}",
            "permission_denied",
        )


def _read_persisted(path: Path) -> tuple[int, dict[int, pki.Revocation]]:
    """The CRL number and revocations kept in ``path``; ConfigError naming it when it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        number = int(data["crl_number"])
        entries = {}
        for item in data["revoked"]:
            # not Revocation.from_dict: a CA-signed list may carry any RFC 5280 reason, and each must load
            date = dt.datetime.fromisoformat(str(item["date"]))
            entry = pki.Revocation(int(str(item["serial"]), 16), date if date.tzinfo else date.replace(
                tzinfo=dt.timezone.utc), str(item["reason"]), str(item["site"]), bool(item["removes_site"]))
            entries[entry.serial] = entry
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"the revocation record {path} is unreadable or damaged ({exc}); restore it from a backup of the "
            "server's state folder (deleting it would let a server whose bundle lacks the newest crl.pem accept "
            "revoked sites again: do so only after copying the newest ca/crl.pem into the bundle)"
        ) from None
    return number, entries


def _write_persisted(path: Path, number: int, entries: dict[int, pki.Revocation]) -> None:
    """Writes the record atomically (``write_atomic``; 0600, as ``mkstemp`` made it before)."""
    record = {"crl_number": number,
              "revoked": [entries[serial].to_dict() for serial in sorted(entries)]}
    write_atomic(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)
