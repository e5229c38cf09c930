"""The rules a key bundle must keep, one function each.

``load_bundle`` (in ``bundle``) calls them and lets the first broken rule raise; ``keys verify``
(in ``keycheck``) calls the same functions and reports every broken one. Each raises a
``BundleProblem``: the file, what is wrong and what to do, so that both say the same thing.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from fedfms_secure.errors import FedFmsError, KeyMaterialError
from fedfms_secure.he.ckks import CkksParams, context_fingerprint, load_context, params_of
from fedfms_secure.keys import pki

MANIFEST = "manifest.json"
CRL = "crl.pem"
ENVELOPE_KEY = "envelope.key"
FILES = ("ca.crt", "tls.crt", "tls.key", "ckks.ctx")
# a site bundle's copies of the other sites' certificates: the CA's word for each envelope key it seals to
PEERS_DIR = "peers"
SITE_MADE_ENVELOPE_KEY_MISSING = (
    f"this site made its envelope key itself (`fedfms-secure keys envelope-key`), so its bundle comes without it; "
    f"copy that key file here as {ENVELOPE_KEY} (mode 0600)"
)
PASSPHRASE_FIX = "give the passphrase with --passphrase-file"


class BundleProblem(KeyMaterialError):
    """A broken bundle rule: ``file``, ``problem`` (what is wrong) and ``fix`` (what to do).

    ``str()`` is the sentence ``load_bundle`` raises; ``as_dict()`` the entry ``keys verify`` lists.
    """

    def __init__(self, file: Path | str, problem: str, fix: str, *, names_file: bool = False) -> None:
        self.file, self.problem, self.fix = str(file), problem, fix
        # names_file: the problem is a whole sentence that already names the file
        super().__init__(f"{problem}; {fix}" if names_file else f"{file} {problem}; {fix}")

    def as_dict(self) -> dict[str, str]:
        """The problem as ``keys verify`` reports it."""
        return {"file": self.file, "problem": self.problem, "fix": self.fix}


def bundle_files(role: str, he_source: str) -> tuple[str, ...]:
    """The files a bundle of ``role`` holds (besides ``manifest.json`` and an optional ``crl.pem``)."""
    if role == "server":
        return FILES
    return ("ca.crt", "tls.crt", "tls.key", ENVELOPE_KEY) + (("ckks.ctx",) if he_source == "dealer" else ())


def private_files(role: str, he_source: str) -> tuple[str, ...]:
    """The files of a bundle that must be readable by their owner only (mode 0600)."""
    if role == "server":
        return ("tls.key",)
    return ("tls.key", ENVELOPE_KEY) + (("ckks.ctx",) if he_source == "dealer" else ())


def site_made_envelope_key(manifest: dict[str, Any]) -> bool:
    """Whether the site of this client manifest made its envelope key itself (``keys envelope-key``)."""
    return manifest.get("envelope_key_source") == "site"


def export_fix(manifest: dict[str, Any]) -> str:
    """What to do about a file of this bundle that is damaged: export it again."""
    who = "server" if manifest["role"] == "server" else f"client {manifest['name']}"
    return f"export the bundle again with `fedfms-secure keys export {who} --from DIR --out BUNDLE --update`"


def check_listed_files(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest lists no file that a bundle of its role and CKKS-key source must not hold."""
    role, source = manifest["role"], manifest["ckks"]["source"]
    unexpected = sorted(set(manifest["files"]) - set(bundle_files(role, source)))
    if unexpected:
        raise BundleProblem(path / MANIFEST, f"lists {', '.join(unexpected)}, which a {role} bundle whose CKKS key "
                            f"comes from the {source} must not hold", export_fix(manifest))


def read_file(path: Path, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of bundle file ``name``, present and matching its checksum in the manifest.

    An envelope key the site made itself was never on the provisioning host, so the manifest has
    no checksum of it: it is checked against the listed public key instead (``check_envelope_key``).
    """
    file = path / name
    if name == ENVELOPE_KEY and site_made_envelope_key(manifest):
        if not file.is_file():
            raise BundleProblem(file, "is missing", SITE_MADE_ENVELOPE_KEY_MISSING)
        return file.read_bytes()
    fix = export_fix(manifest)
    if not file.is_file():
        raise BundleProblem(file, "is missing from the bundle", fix)
    digest = manifest["files"].get(name)
    if digest is None:
        raise BundleProblem(path / MANIFEST, f"lists no checksum for {name}", fix)
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise BundleProblem(file, f"does not match its checksum in {MANIFEST}: modified or replaced after export", fix)
    return data


def check_private_mode(file: Path) -> None:
    """A private file is readable by its owner only."""
    mode = stat.S_IMODE(file.stat().st_mode)
    if mode & 0o077:
        raise BundleProblem(file, f"is a private file readable by others (mode {mode:o})", f"run `chmod 600 {file}`")


def parse_cert(file: Path, data: bytes, manifest: dict[str, Any]) -> x509.Certificate:
    """The certificate in ``data`` (read from ``file``)."""
    try:
        return pki.cert_from_pem(data, source=str(file))
    except KeyMaterialError as exc:
        raise BundleProblem(file, str(exc), export_fix(manifest), names_file=True) from None


def check_chain(path: Path, ca: x509.Certificate, cert: x509.Certificate, manifest: dict[str, Any]) -> None:
    """``tls.crt`` is issued by the bundle's CA and valid now."""
    try:
        pki.verify_issued_by(cert, ca, source=str(path / "tls.crt"))
    except KeyMaterialError as exc:
        raise BundleProblem(path / "tls.crt", str(exc), f"run `fedfms-secure keys rotate-tls`, then "
                            f"{export_fix(manifest)}", names_file=True) from None


def check_site_cert(path: Path, cert: x509.Certificate, manifest: dict[str, Any]) -> None:
    """A site's certificate is issued to the manifest's site and certifies its listed envelope key."""
    name, fix = manifest["name"], export_fix(manifest)
    if pki.common_name(cert) != name:
        raise BundleProblem(path / "tls.crt", f"is issued to {pki.common_name(cert)!r}, but the manifest names "
                            f"{name!r}", fix)
    try:
        certified = pki.envelope_key_of(cert)
    except KeyMaterialError as exc:
        raise BundleProblem(path / "tls.crt", str(exc), fix, names_file=True) from None
    if certified is not None and certified.hex() != manifest["envelope_keys"].get(name):
        raise BundleProblem(path / "tls.crt", "certifies another envelope key than the manifest lists", fix)


def envelope_key_fingerprint(public: bytes) -> str:
    """SHA-256 of a raw X25519 envelope public key, in hex: what sites compare out of band."""
    return hashlib.sha256(public).hexdigest()


def certified_envelope_keys(path: Path, ca: x509.Certificate, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The envelope public keys a site bundle's manifest lists for the other sites, each checked
    against that site's CA-signed certificate in ``peers/<site>.crt``.

    The manifest is not signed: an envelope key there that the federation CA did not certify (one
    put in by whoever could write the bundle) would get the CKKS secret key sealed to its holder.
    """
    fix = export_fix(manifest)
    out: dict[str, bytes] = {}
    for site, listed in sorted(manifest["envelope_keys"].items()):
        if site == manifest["name"]:
            continue  # this site's own key: check_site_cert compares it with tls.crt
        file = path / PEERS_DIR / f"{site}.crt"
        if not file.is_file():
            raise BundleProblem(file, f"is missing: the envelope key {MANIFEST} lists for site {site!r} is not "
                                "certified by the federation CA in this bundle", fix)
        cert = parse_cert(file, file.read_bytes(), manifest)
        try:
            pki.verify_issued_by(cert, ca, source=str(file))
            certified = pki.envelope_key_of(cert)
        except KeyMaterialError as exc:
            raise BundleProblem(file, str(exc), fix, names_file=True) from None
        if pki.common_name(cert) != site:
            raise BundleProblem(file, f"is issued to {pki.common_name(cert)!r}, not to site {site!r}", fix)
        if certified is None:
            raise BundleProblem(file, f"certifies no envelope key for site {site!r}",
                                f"run `fedfms-secure keys rotate-tls {site}`, then {fix}")
        if certified.hex() != listed:
            raise BundleProblem(
                path / MANIFEST,
                f"lists an envelope key for site {site!r} that the federation CA did not certify (sha256 "
                f"{envelope_key_fingerprint(bytes.fromhex(listed))[:16]}..., {PEERS_DIR}/{site}.crt certifies "
                f"{envelope_key_fingerprint(certified)[:16]}...): the CKKS key would be sealed to whoever holds it",
                f"REFUSING to seal to it: {fix}, and find out who changed {MANIFEST}")
        out[site] = certified
    return out


def load_key(file: Path, data: bytes, passphrase: bytes | None, loader: Any) -> Any:
    """The private key in ``data``, opened with ``loader(data, source, passphrase)``."""
    if pki.is_encrypted_pem(data) and not passphrase:
        raise BundleProblem(file, "is encrypted with a passphrase", PASSPHRASE_FIX)
    try:
        return loader(data, str(file), passphrase)
    except KeyMaterialError as exc:
        raise BundleProblem(file, str(exc), "give the right --passphrase-file, or export the bundle again",
                            names_file=True) from None


def load_tls_key(path: Path, data: bytes, cert: x509.Certificate, passphrase: bytes | None,
                 manifest: dict[str, Any]) -> pki.PrivateKey:
    """The TLS private key of the bundle, which must be the key of ``tls.crt``."""
    key = load_key(path / "tls.key", data, passphrase,
                   lambda d, s, p: pki.private_key_from_pem(d, source=s, passphrase=p))
    if not pki.key_matches_cert(key, cert):
        raise BundleProblem(path / "tls.key", "is not the private key of tls.crt", export_fix(manifest))
    return key


def check_envelope_key(path: Path, raw: bytes, passphrase: bytes | None,
                       manifest: dict[str, Any]) -> x25519.X25519PrivateKey:
    """A site's envelope key, whose public half is the one the manifest lists for the site."""
    name = manifest["name"]
    key = load_key(path / ENVELOPE_KEY, raw, passphrase,
                   lambda d, s, p: pki.envelope_key_from_pem(d, source=s, passphrase=p))
    if pki.raw_public(key).hex() != manifest["envelope_keys"].get(name):
        raise BundleProblem(path / ENVELOPE_KEY, f"is not the envelope key that {MANIFEST} lists for site {name!r}",
                            export_fix(manifest))
    return key


def check_context(file: Path, raw: bytes, manifest: dict[str, Any], params: CkksParams) -> None:
    """``ckks.ctx``: the server's holds no secret key, a site's holds the one the manifest names;
    the parameters are the manifest's."""
    fix, role, fingerprint = export_fix(manifest), manifest["role"], manifest["ckks"].get("fingerprint")
    try:
        ctx = load_context(raw, source=str(file))
    except FedFmsError as exc:
        raise BundleProblem(file, str(exc), fix, names_file=True) from None
    if role == "server" and ctx.has_secret_key():
        raise BundleProblem(file, "the server's CKKS context holds the SECRET KEY: the server could decrypt every "
                            "update", "REFUSING to use it: delete this bundle now and export a new one with "
                            "`fedfms-secure keys export server`")
    if role == "client":
        if not ctx.has_secret_key():
            raise BundleProblem(file, "has no CKKS secret key (is it the server's params-only context?)", fix)
        if context_fingerprint(ctx) != fingerprint:
            raise BundleProblem(file, f"has context fingerprint {context_fingerprint(ctx)[:16]}..., the manifest says "
                                f"{str(fingerprint)[:16]}...: the context belongs to another federation", fix)
    check_params(file, ctx, params, fix)


def check_params(file: Path, ctx: Any, params: CkksParams, fix: str) -> None:
    """The context's CKKS ring is the manifest's (a manifest edited after export shows here)."""
    try:
        actual = params_of(ctx)
    except FedFmsError as exc:
        raise BundleProblem(file, f"holds CKKS parameters this build refuses ({exc})", fix) from None
    if actual != params.ring:  # the packing (if any) lives in the manifest only
        raise BundleProblem(file, f"has CKKS parameters {actual.to_dict()}, the manifest says "
                            f"{params.ring.to_dict()}", fix)
