"""What a federation's keys are and whether a bundle is sound: ``keys show`` and ``keys verify``.

``show_federation(src)`` reads a provisioning folder: for the CA, the server and every site, the
certificate's SHA-256 fingerprint, serial, algorithm, expiry (``expiring`` within
``EXPIRY_WARNING_DAYS``), whether it is revoked, and which keys the party holds; for a site also the
SHA-256 of the envelope public key its certificate certifies (compared out of band with the site).

``verify_bundle(path, passphrase=None)`` checks one exported bundle and returns every problem it
finds (not only the first), each naming the file and the fix: the manifest, the checksums, the
file modes (private files 0600, no file writable by others), the certificate chain to the
bundle's CA and its expiry, that each private key matches, the envelope key, the CKKS context
(loaded with TenSEAL: a server bundle must hold no secret key, anywhere in the folder; its
parameters are the manifest's), a site's ``he/`` contexts (those encrypted at rest are opened with
``passphrase``; without it they are reported as encrypted, not checked), and the CRL's signature
when there is one.
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path
from typing import Any

from cryptography import x509

from fedfms_secure.keys import pki, rules
from fedfms_secure.keys.bundle import read_manifest
from fedfms_secure.keys.rules import CRL, ENVELOPE_KEY, MANIFEST, BundleProblem, bundle_files, private_files
from fedfms_secure.he.ckks import load_context
from fedfms_secure.keys.hestore import HE_DIR, LOCK_FILE, HePassphraseError, HeStore
from fedfms_secure.keys.federation import read_federation
from fedfms_secure.errors import FedFmsError, KeyMaterialError

EXPIRY_WARNING_DAYS = 30
_MAX_SCAN_BYTES = 64 * 1024 * 1024


# --- keys show -----------------------------------------------------------------------------------
def show_federation(src: Path) -> dict[str, Any]:
    """Every party of the provisioning folder ``src``: certificate facts and the keys it holds."""
    src = Path(src)
    meta = read_federation(src)
    now = dt.datetime.now(dt.timezone.utc)
    by_serial = {int(r["serial"], 16): r for r in meta["revocations"] if isinstance(r, dict) and "serial" in r}
    removed = {r["site"]: r for r in by_serial.values() if r.get("removes_site")}
    source = meta["ckks"].get("source", "dealer")
    warnings: list[str] = []

    def party(name: str, role: str, cert_file: Path, keys: list[str], key_file: Path | None) -> dict[str, Any]:
        cert = pki.load_cert(cert_file)
        days_left = (cert.not_valid_after_utc - now).total_seconds() / 86400
        entry = by_serial.get(cert.serial_number)
        info: dict[str, Any] = {
            "party": name,
            "role": role,
            "certificate": str(cert_file.relative_to(src)),
            "subject": pki.common_name(cert),
            "serial": format(cert.serial_number, "x"),
            "fingerprint_sha256": pki.cert_fingerprint(cert),
            "algorithm": pki.cert_algorithm(cert),
            "not_before": cert.not_valid_before_utc.isoformat(timespec="seconds"),
            "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds"),
            "days_left": int(days_left),
            "expiring": 0 <= days_left < EXPIRY_WARNING_DAYS,
            "expired": days_left < 0,
            "revoked": {"date": entry["date"], "reason": entry["reason"]} if entry else None,
            "removed": name in removed,
            "key_encrypted": bool(key_file and key_file.is_file() and pki.is_encrypted_pem(key_file.read_bytes())),
            "keys": keys,
        }
        if role == "site":  # what the CA certified: sites compare it out of band with the key they made
            certified = pki.envelope_key_of(cert)
            info["envelope_key_sha256"] = rules.envelope_key_fingerprint(certified) if certified else None
        if name in removed:
            info["revoked"] = {"date": removed[name]["date"], "reason": removed[name]["reason"]}
        if info["expired"] and not info["removed"]:
            warnings.append(f"{name}: certificate {info['certificate']} EXPIRED on {cert.not_valid_after_utc:%Y-%m-%d}; "
                            f"run `fedfms-secure keys rotate-tls {name if role == 'site' else '--all'}`")
        elif info["expiring"] and not info["removed"]:
            fix = ("a new CA means a new federation: plan it" if role == "ca"
                   else f"run `fedfms-secure keys rotate-tls {name if role == 'site' else '--all'}`")
            warnings.append(f"{name}: certificate {info['certificate']} expires in {int(days_left)} days "
                            f"({cert.not_valid_after_utc:%Y-%m-%d}); {fix}")
        return info

    parties = [
        party("ca", "ca", src / "ca" / "ca.crt",
              ["CA signing key (ca/ca.key): signs certificates and the revocation list; keep it offline"],
              src / "ca" / "ca.key"),
        party("server", "server", src / "server" / "tls.crt",
              ["TLS key (server/tls.key)", "CKKS parameters only (he/server.ctx): no key, cannot decrypt"],
              src / "server" / "tls.key"),
    ]
    for name in meta["clients"]:
        folder = src / "clients" / name
        he_key = ("CKKS secret key: generated at a site via `keys he-init`, sealed to this site's envelope key"
                  if source == "site" else "CKKS secret key: dealt by this provisioning host (he/site.ctx)")
        envelope = ("envelope key, X25519: made at the site (`keys envelope-key`); this host holds only its public key"
                    if name in meta.get("site_envelope_keys", []) else
                    f"envelope key, X25519 (clients/{name}/{ENVELOPE_KEY})")
        keys = [f"TLS key (clients/{name}/tls.key)", envelope, he_key]
        parties.append(party(name, "site", folder / "tls.crt", keys, folder / "tls.key"))
    if source == "dealer" and (src / "he" / "site.ctx").exists():
        warnings.append(f"{src / 'he' / 'site.ctx'}: this provisioning host holds the CKKS secret key (dealer mode); "
                        "delete the file once every site bundle is delivered")
    crl_info = None
    crl_file = src / "ca" / CRL
    if crl_file.is_file():
        crl = pki.crl_from_pem(crl_file.read_bytes(), pki.load_cert(src / "ca" / "ca.crt"), source=str(crl_file))
        crl_info = {"file": str(crl_file.relative_to(src)), "number": pki.crl_number(crl), "entries": len(crl),
                    "next_update": crl.next_update_utc.isoformat(timespec="seconds") if crl.next_update_utc else None}
    return {
        "folder": str(src),
        "federation": meta["federation"],
        "server_host": meta["server_host"],
        "algorithm": meta.get("algorithm"),
        "ca_algorithm": meta.get("ca_algorithm", meta.get("algorithm")),
        "keys_encrypted": bool(meta.get("encrypted")),
        "ckks": {"source": source, "params_fingerprint": meta["ckks"].get("params_fingerprint"),
                 "fingerprint": meta["ckks"].get("fingerprint")},
        "parties": parties,
        "revocations": meta["revocations"],
        "crl": crl_info,
        "warnings": warnings,
    }


# --- keys verify ---------------------------------------------------------------------------------
class _Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[dict[str, str]] = []
        self.notes: list[str] = []
        self.files: list[dict[str, Any]] = []

    def problem(self, file: Path | str, problem: str, fix: str) -> None:
        self.problems.append({"file": str(file), "problem": problem, "fix": fix})

    def check(self, rule: Any, *args: Any) -> Any:
        """Run one bundle rule (``rules``): its result, or None with its problem reported."""
        try:
            return rule(*args)
        except BundleProblem as exc:
            self.problems.append(exc.as_dict())
            return None


def verify_bundle(path: Path, passphrase: bytes | None = None) -> dict[str, Any]:
    """Check the bundle at ``path``; ``ok`` is False when any problem was found."""
    path = Path(path)
    rep = _Report(path)
    result: dict[str, Any] = {"bundle": str(path), "role": None, "name": None, "federation": None}
    export = "export the bundle again with `fedfms-secure keys export`"
    if not path.is_dir():
        rep.problem(path, "the bundle folder does not exist", "give the folder that `keys export` wrote")
        return _finish(result, rep)
    try:
        manifest, params = read_manifest(path, "`fedfms-secure keys export`")
    except KeyMaterialError as exc:
        rep.problem(path / MANIFEST, str(exc), export)
        _check_modes(path, rep, private=set(), role=None)
        return _finish(result, rep)
    role, name, source = manifest["role"], manifest["name"], manifest["ckks"]["source"]
    result.update(role=role, name=name, federation=manifest["federation"], ckks_source=source)
    export = rules.export_fix(manifest)
    expected = bundle_files(role, source)
    private = set(private_files(role, source))

    # the same rules load_bundle applies (rules.py), each problem reported instead of raised
    data: dict[str, bytes] = {}
    for fname in expected:
        raw = rep.check(rules.read_file, path, fname, manifest)
        if raw is None and (path / fname).is_file():
            raw = (path / fname).read_bytes()  # a checksum problem: still check what the file holds
        if raw is not None:
            data[fname] = raw
    rep.check(rules.check_listed_files, path, manifest)
    _check_modes(path, rep, private=private, role=role)

    ca = cert = None
    if "ca.crt" in data:
        ca = rep.check(rules.parse_cert, path / "ca.crt", data["ca.crt"], manifest)
    if "tls.crt" in data:
        cert = rep.check(rules.parse_cert, path / "tls.crt", data["tls.crt"], manifest)
    if ca is not None and cert is not None:
        rep.check(rules.check_chain, path, ca, cert, manifest)
        _check_validity(path, ca, cert, manifest, rep)
    if cert is not None and role == "client":
        rep.check(rules.check_site_cert, path, cert, manifest)
    if cert is not None and "tls.key" in data:
        rep.check(rules.load_tls_key, path, data["tls.key"], cert, passphrase, manifest)
    if role == "client" and ENVELOPE_KEY in data:
        rep.check(rules.check_envelope_key, path, data[ENVELOPE_KEY], passphrase, manifest)
    if "ckks.ctx" in data:
        rep.check(rules.check_context, path / "ckks.ctx", data["ckks.ctx"], manifest, params)
    peers: set[str] = set()
    if role == "client" and ca is not None:
        certified = rep.check(rules.certified_envelope_keys, path, ca, manifest) or {}
        peers = {f"{rules.PEERS_DIR}/{site}.crt" for site in manifest["envelope_keys"] if site != name}
        for site, public in sorted(certified.items()):
            rep.notes.append(f"envelope key of {site!r}: sha256 {rules.envelope_key_fingerprint(public)}, certified "
                             f"by the CA ({rules.PEERS_DIR}/{site}.crt)")
    _scan_extra_files(path, set(expected) | {MANIFEST, CRL} | peers, role, rep, export)
    if role == "client" and (path / HE_DIR).is_dir():
        _check_he_store(path, params, rep, passphrase)
    if (path / CRL).is_file() and ca is not None:
        _check_crl(path / CRL, ca, cert, rep)
    return _finish(result, rep)


def _finish(result: dict[str, Any], rep: _Report) -> dict[str, Any]:
    result.update(ok=not rep.problems, problems=rep.problems, notes=rep.notes, files=rep.files)
    return result


def _check_modes(path: Path, rep: _Report, *, private: set[str], role: str | None) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
        rel = str(file.relative_to(path))
        if file.is_symlink():
            rep.problem(file, "is a symbolic link; a bundle holds plain files only", "replace it with the file itself")
            continue
        mode = stat.S_IMODE(file.stat().st_mode)
        # a site keeps its CKKS contexts under he/ (generated at a site or opened from an envelope);
        # its empty lock file holds nothing
        lock = rel == f"{HE_DIR}/{LOCK_FILE}" and file.stat().st_size == 0
        secret = rel in private or (role == "client" and rel.startswith(f"{HE_DIR}/") and not lock)
        rep.files.append({"file": rel, "mode": f"{mode:o}", "private": secret})
        if secret and mode & 0o077:
            rep.check(rules.check_private_mode, file)
        elif mode & 0o022:
            rep.problem(file, f"is writable by others (mode {mode:o})", f"run `chmod 644 {file}`")
    dir_mode = stat.S_IMODE(path.stat().st_mode)
    if dir_mode & 0o022:
        rep.problem(path, f"the bundle folder is writable by others (mode {dir_mode:o})", f"run `chmod 700 {path}`")
    elif dir_mode & 0o077:
        rep.notes.append(f"{path}: folder mode {dir_mode:o}; 700 keeps others from listing it")


def _check_validity(path: Path, ca: x509.Certificate, cert: x509.Certificate, manifest: dict[str, Any],
                    rep: _Report) -> None:
    """What only ``keys verify`` looks at: expiry ahead, and that the server's certificate names its host."""
    now = dt.datetime.now(dt.timezone.utc)
    for label, c in (("ca.crt", ca), ("tls.crt", cert)):
        left = (c.not_valid_after_utc - now).total_seconds() / 86400
        if 0 <= left < EXPIRY_WARNING_DAYS:
            rep.notes.append(f"{path / label}: expires in {int(left)} days ({c.not_valid_after_utc:%Y-%m-%d}); "
                             "plan `fedfms-secure keys rotate-tls`")
        if label == "ca.crt" and left < 0:
            rep.problem(path / label, f"the CA certificate expired on {c.not_valid_after_utc:%Y-%m-%d}",
                        "provision a new federation with `fedfms-secure keys init`")
    if manifest["role"] == "server":
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(v) for v in san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.IPAddress)]
        if manifest["server_host"] not in hosts:
            rep.problem(path / "tls.crt", f"does not name the server host {manifest['server_host']!r} (SANs: "
                        f"{', '.join(hosts)}): sites would refuse the server", rules.export_fix(manifest))


def _check_he_store(path: Path, params: Any, rep: _Report, passphrase: bytes | None = None) -> None:
    """A site's ``he/`` folder: its current (and pending) context is there, private, holds the secret
    key with the recorded fingerprint and has the manifest's parameters. A context encrypted at rest
    is opened with ``passphrase``; without one it is noted as encrypted (its content unchecked)."""
    store = HeStore(path, passphrase=passphrase)
    refetch = "delete the bundle's he/ folder and start the site again: it fetches its envelope from the server"
    try:
        keys = [k for k in (store.current(), store.pending()) if k is not None]
    except KeyMaterialError as exc:
        rep.problem(store.folder, str(exc), refetch)
        return
    for key in keys:
        encrypted = store.is_encrypted(key)
        try:
            rep.check(rules.check_params, key.path, store.load(key), params, refetch)
        except HePassphraseError as exc:
            if passphrase:
                rep.problem(key.path, str(exc), "give the bundle's passphrase with --passphrase-file (if it is "
                            f"right, {refetch})")
            else:
                rep.notes.append(f"{key.path}: CKKS key epoch {key.epoch}, encrypted with the bundle's passphrase; "
                                 "give it with --passphrase-file to check the context")
            continue
        except KeyMaterialError as exc:
            rep.problem(store.folder, str(exc), refetch)
            continue
        if encrypted:
            rep.notes.append(f"{key.path}: encrypted at rest with the bundle's passphrase")
        elif store.protected:
            rep.notes.append(f"{key.path}: stored in the clear although tls.key is encrypted (written by an older "
                             "version or without --passphrase-file); the next key epoch is stored encrypted")
    if keys:
        rep.notes.append(f"{store.folder}: CKKS key epoch {keys[0].epoch} ({keys[0].fingerprint[:16]}...)"
                         + (f", pending epoch {keys[1].epoch}" if len(keys) > 1 else ""))


def _scan_extra_files(path: Path, known: set[str], role: str, rep: _Report, export: str) -> None:
    """Files the manifest does not know: in a server bundle each is a problem, and any CKKS context
    with a secret key anywhere in it is named loudly."""
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = str(file.relative_to(path))
        if rel in known:
            continue
        holds_secret = False
        if file.stat().st_size <= _MAX_SCAN_BYTES:
            try:
                holds_secret = load_context(file.read_bytes(), source=str(file)).has_secret_key()
            except (FedFmsError, OSError, ValueError, RuntimeError):
                holds_secret = False
        if role == "server":
            what = ("a CKKS context WITH THE SECRET KEY: the server could decrypt every update" if holds_secret
                    else "not part of a server bundle")
            rep.problem(file, what, "delete it; a server bundle holds only what `keys export server` writes")
        elif not rel.startswith("he/"):
            rep.notes.append(f"{file}: not part of the bundle (kept by the site?)")


def _check_crl(file: Path, ca: x509.Certificate, cert: x509.Certificate | None, rep: _Report) -> None:
    try:
        crl = pki.crl_from_pem(file.read_bytes(), ca, source=str(file))
    except KeyMaterialError as exc:
        rep.problem(file, str(exc), "copy ca/crl.pem from the provisioning folder again")
        return
    rep.notes.append(f"{file}: revocation list number {pki.crl_number(crl)}, {len(crl)} revoked certificate(s), "
                     "signed by the CA")
    now = dt.datetime.now(dt.timezone.utc)
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        rep.notes.append(f"{file}: past its next update ({crl.next_update_utc:%Y-%m-%d}); it still revokes what it "
                         "lists; issue a fresh one with the next `keys revoke` or `keys rotate-tls`")
    if cert is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        rep.problem(file.parent / "tls.crt", "this bundle's own certificate is revoked by its crl.pem",
                    "export a bundle with a current certificate (`fedfms-secure keys rotate-tls`)")
