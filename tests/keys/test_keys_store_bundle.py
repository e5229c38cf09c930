"""Provisioning (init_federation), bundle export and the checks of load_bundle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509

from fedfms_secure.keys import pki
from fedfms_secure.he.ckks import CkksParams, context_fingerprint, serialize_site_context
from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.he.aggregate import make_aggregator
from fedfms_secure.errors import ConfigError, KeyMaterialError

CLIENTS = ["site-a", "site_b.2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_federation(
        tmp_path_factory.mktemp("fed") / "keys", federation="demo", server_host="localhost", clients=CLIENTS,
        he_dealer=True,  # these tests check the bundles of the dealer flow
    )


@pytest.fixture(scope="module")
def bundles(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {"server": export_bundle("server", None, store, root / "server")}
    for name in CLIENTS:
        out[name] = export_bundle("client", name, store, root / name)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_init_layout_and_modes(store: Path) -> None:
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    assert files == sorted(
        ["federation.json", "ca/ca.crt", "ca/ca.key", "server/tls.crt", "server/tls.key", "he/site.ctx",
         "he/server.ctx"] + [f"clients/{c}/{f}" for c in CLIENTS for f in ("tls.crt", "tls.key", "envelope.key")]
    )
    for secret in ["ca/ca.key", "server/tls.key", "he/site.ctx"] + [
        f"clients/{c}/{f}" for c in CLIENTS for f in ("tls.key", "envelope.key")
    ]:
        assert _mode(store / secret) == 0o600, secret
    meta = json.loads((store / "federation.json").read_text())
    assert meta["federation"] == "demo" and meta["clients"] == CLIENTS and meta["algorithm"] == "ecdsa-p256"
    assert CkksParams.from_dict(meta["ckks"]["params"]) == CkksParams()
    assert len(meta["ckks"]["fingerprint"]) == 64
    server_cert = pki.load_cert(store / "server" / "tls.crt")
    assert pki.common_name(pki.load_cert(store / "clients" / "site-a" / "tls.crt")) == "site-a"
    pki.verify_issued_by(server_cert, pki.load_cert(store / "ca" / "ca.crt"), source="server/tls.crt")


def test_init_refusals(store: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="use another --out or delete it"):
        init_federation(store, federation="demo", server_host="localhost", clients=["a"])
    bad = [
        ({"clients": []}, "client list is empty"),
        ({"clients": ["a", "b", "a"]}, r"duplicate client names \['a'\]"),
        ({"clients": ["a/b"]}, "client name 'a/b' is not allowed"),
        ({"clients": [".."]}, "is not allowed"),
        ({"clients": ["x" * 65]}, "is not allowed"),
        ({"clients": ["a"], "algorithm": "ed25519"}, "Ed25519"),
        ({"clients": ["a"], "server_host": ""}, "server_host is empty"),
    ]
    for kwargs, message in bad:
        args = {"federation": "demo", "server_host": "localhost", **kwargs}
        with pytest.raises(ConfigError, match=message):
            init_federation(tmp_path / "new", **args)


@pytest.mark.parametrize("host", ["fl.example.org:50051", "https://fl.example.org", "fl/example", "a b", "[::1]"])
def test_init_refuses_a_host_with_port_scheme_or_path(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="not a bare DNS name or IP address"):
        init_federation(tmp_path / "k", federation="demo", server_host=host, clients=["a"])


def test_ipv6_loopback_host_gets_all_loopback_names(tmp_path: Path) -> None:
    store = init_federation(tmp_path / "k", federation="demo", server_host="::1", clients=["a"])
    cert = pki.load_cert(store / "server" / "tls.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)) == ["127.0.0.1", "::1"]


@pytest.mark.parametrize("existing", [False, True])
def test_init_rolls_back_when_provisioning_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    out = tmp_path / "keys"
    if existing:
        out.mkdir()
    real, calls = pki.issue_certificate, []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) == 2:  # CA and server certificate are on disk by now
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(pki, "issue_certificate", failing)
    with pytest.raises(OSError, match="disk full"):
        init_federation(out, federation="demo", server_host="localhost", clients=["a", "b"])
    assert len(calls) == 2
    if existing:  # the operator's empty folder stays, emptied again
        assert out.is_dir() and list(out.iterdir()) == []
    else:
        assert not out.exists()


def test_export_bundle_contents_and_modes(store: Path, bundles: dict[str, Path]) -> None:
    for role, path in bundles.items():
        own = {"ca.crt", "ckks.ctx", "tls.crt", "tls.key"} | ({"envelope.key", "peers"} if role != "server" else set())
        assert sorted(p.name for p in path.iterdir()) == sorted(own | {"manifest.json"})
        if role != "server":  # every other site's certificate: the CA's word for its envelope key
            assert sorted(p.name for p in (path / "peers").iterdir()) == sorted(f"{c}.crt" for c in CLIENTS if c != role)
        assert _mode(path / "tls.key") == 0o600
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["role"] == ("server" if role == "server" else "client")
        assert manifest["name"] == role and manifest["clients"] == CLIENTS
        assert manifest["ckks"]["has_secret_key"] is (role != "server")
        assert manifest["ckks"]["source"] == "dealer"
        assert set(manifest["envelope_keys"]) == set(CLIENTS)
        assert set(manifest["files"]) == own - {"peers"}  # certificates: trusted by the CA signature
    assert _mode(bundles["site-a"] / "ckks.ctx") == 0o600
    with pytest.raises(KeyMaterialError, match="known clients: site-a, site_b.2"):
        export_bundle("client", "site-z", store, store.parent / "z")
    with pytest.raises(KeyMaterialError, match="use another --out"):
        export_bundle("server", None, store, bundles["site-a"])


def test_export_refuses_a_server_context_with_the_secret_key(store: Path, tmp_path: Path) -> None:
    leaky = _copy(store, tmp_path)
    (leaky / "he" / "server.ctx").write_bytes((leaky / "he" / "site.ctx").read_bytes())
    with pytest.raises(KeyMaterialError, match=r"server.ctx holds the CKKS secret key"):
        export_bundle("server", None, leaky, tmp_path / "server-bundle")
    assert not (tmp_path / "server-bundle").exists()


def test_export_refuses_a_malformed_federation_json(store: Path, tmp_path: Path) -> None:
    broken = _copy(store, tmp_path)
    meta = json.loads((broken / "federation.json").read_text())
    for change, message in [
        ({"clients": "site-a"}, "clients 'site-a' is not a list"),
        ({"ckks": {"params": {}}}, "ckks has no fingerprint of the dealt context"),
    ]:
        (broken / "federation.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(KeyMaterialError, match=rf"federation.json: {message}.*keys init"):
            export_bundle("server", None, broken, tmp_path / "out")
    del meta["server_host"]
    (broken / "federation.json").write_text(json.dumps(meta))
    with pytest.raises(KeyMaterialError, match="federation.json is incomplete: it lacks server_host"):
        export_bundle("server", None, broken, tmp_path / "out")
    (broken / "federation.json").write_text("[1, 2]")
    with pytest.raises(KeyMaterialError, match="federation.json holds a JSON list"):
        export_bundle("server", None, broken, tmp_path / "out")


def test_server_bundle_holds_no_secret_key(bundles: dict[str, Path]) -> None:
    server = load_bundle(bundles["server"], role="server")
    ctx = server.context()
    assert not ctx.has_secret_key() and not ctx.has_public_key()
    assert len(server.context_bytes) < 200
    client = load_bundle(bundles["site-a"], role="client")
    assert client.context().has_secret_key()
    assert server.fingerprint == client.fingerprint == context_fingerprint(client.context())
    assert (server.federation, server.server_host, server.clients) == ("demo", "localhost", tuple(CLIENTS))
    assert client.name == "site-a" and client.params == CkksParams()


def test_bundle_repr_hides_private_key_and_context(bundles: dict[str, Path]) -> None:
    for name in ("server", "site-a"):
        bundle = load_bundle(bundles[name], role="server" if name == "server" else "client")
        text = repr(bundle)
        assert bundle.name in text and bundle.fingerprint in text
        assert "key_pem" not in text and "context_bytes" not in text
        assert repr(bundle.key_pem) not in text and repr(bundle.context_bytes)[:40] not in text
        assert b"PRIVATE KEY" in bundle.key_pem  # still there, just not printed


def test_bundles_work_end_to_end_for_ckks(bundles: dict[str, Path]) -> None:
    server = load_bundle(bundles["server"], role="server")
    sites = [load_bundle(bundles[c], role="client") for c in CLIENTS]
    aggregator = make_aggregator("ckks", server.context(), server.fingerprint)
    codecs = [make_site_codec("ckks", s.context(), s.fingerprint) for s in sites]
    total = aggregator.add(*(aggregator.parse(c.encrypt_vector(np.full(5, i + 1.0))[0]) for i, c in enumerate(codecs)))
    assert np.allclose(codecs[1].decrypt_vector([aggregator.dump(total)], 5), 3.0, atol=1e-6)


def test_wrong_role_is_refused(bundles: dict[str, Path]) -> None:
    with pytest.raises(KeyMaterialError, match="is a client bundle .* `fedfms-secure keys export server`"):
        load_bundle(bundles["site-a"], role="server")
    with pytest.raises(KeyMaterialError, match="is a server bundle .* keys export client"):
        load_bundle(bundles["server"], role="client")


def test_tampered_and_missing_files_are_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    tampered = _copy(bundles["site-a"], tmp_path)
    (tampered / "tls.crt").write_bytes((tampered / "tls.crt").read_bytes() + b"\n")
    with pytest.raises(KeyMaterialError, match="tls.crt does not match its checksum"):
        load_bundle(tampered, role="client")

    missing = _copy(bundles["server"], tmp_path / "m")
    (missing / "ca.crt").unlink()
    with pytest.raises(KeyMaterialError, match="ca.crt is missing from the bundle"):
        load_bundle(missing, role="server")
    with pytest.raises(KeyMaterialError, match="bundle folder .*nowhere does not exist"):
        load_bundle(tmp_path / "nowhere", role="client")
    no_manifest = _copy(bundles["server"], tmp_path / "n")
    (no_manifest / "manifest.json").unlink()
    with pytest.raises(KeyMaterialError, match="manifest.json is missing"):
        load_bundle(no_manifest, role="server")

    loose = _copy(bundles["site-a"], tmp_path / "p")
    os.chmod(loose / "ckks.ctx", 0o644)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        load_bundle(loose, role="client")
    loose_server = _copy(bundles["server"], tmp_path / "q")
    os.chmod(loose_server / "tls.key", 0o644)
    with pytest.raises(KeyMaterialError, match=r"tls.key is a private file readable by others \(mode 644\).*chmod 600"):
        load_bundle(loose_server, role="server")


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("role", "edit", "message"),
    [
        ("server", lambda m: m["ckks"].update(params={"poly_modulus_degree": 3000}), r"ckks.params are invalid"),
        ("server", lambda m: m["ckks"]["params"].update(scale_bits=60), "ckks.params are invalid"),
        ("server", lambda m: m["ckks"].update(fingerprint="ab" * 16), "is not a context fingerprint"),
        ("server", lambda m: m["ckks"].update(fingerprint=m["ckks"]["fingerprint"].upper()), "not a context"),
        ("client", lambda m: m.update(clients="site-a"), "clients 'site-a' is not a list of site names"),
        ("client", lambda m: m.update(clients=["site-a", 3]), "is not a list of site names"),
        ("server", lambda m: m["ckks"].update(has_secret_key=True), "has_secret_key is True in a server bundle"),
        ("client", lambda m: m["ckks"].update(has_secret_key=False), "has_secret_key is False in a client bundle"),
        ("client", lambda m: m["ckks"].pop("has_secret_key"), "ckks is not an object with"),
        ("client", lambda m: m.update(role="admin"), "role 'admin' is neither"),
        ("client", lambda m: m.update(files=["ca.crt"]), "files is not a mapping"),
        ("server", lambda m: m.pop("server_host"), "incomplete: it lacks server_host"),
    ],
)
def test_malformed_manifest_is_refused_naming_it(
    bundles: dict[str, Path], tmp_path: Path, role: str, edit, message: str
) -> None:
    bundle = _copy(bundles["server" if role == "server" else "site-a"], tmp_path)
    _edit_manifest(bundle, edit)
    with pytest.raises(KeyMaterialError, match=rf"manifest.json.*{message}.*export the bundle again with") as err:
        load_bundle(bundle, role=role)
    assert str(bundle / "manifest.json") in str(err.value)


def test_server_bundle_with_secret_key_is_refused_loudly(bundles: dict[str, Path], tmp_path: Path) -> None:
    """Even with consistent checksums, a secret key in the server's context is refused."""
    bad = _copy(bundles["server"], tmp_path)
    site_ctx = load_bundle(bundles["site-a"], role="client").context()
    _replace(bad, "ckks.ctx", serialize_site_context(site_ctx))
    with pytest.raises(KeyMaterialError, match="SECRET KEY.*REFUSING"):
        load_bundle(bad, role="server")


def test_mixed_federation_files_are_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    other = init_federation(tmp_path / "other", federation="other", server_host="localhost", clients=["site-a"],
                            he_dealer=True)
    mixed = _copy(bundles["site-a"], tmp_path / "x")
    _replace(mixed, "ca.crt", (other / "ca" / "ca.crt").read_bytes())
    with pytest.raises(KeyMaterialError, match="tls.crt was not issued by this federation's CA"):
        load_bundle(mixed, role="client")
    ctx_swap = _copy(bundles["site-a"], tmp_path / "y")
    _replace(ctx_swap, "ckks.ctx", (other / "he" / "site.ctx").read_bytes())
    with pytest.raises(KeyMaterialError, match="another federation"):
        load_bundle(ctx_swap, role="client")


def _replace(bundle: Path, name: str, data: bytes) -> None:
    """Swap a file and fix its checksum, as an attacker or a careless operator could."""
    pki.write_private(bundle / name, data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_bundle_tls_material_gives_mutual_tls(bundles: dict[str, Path]) -> None:
    server_b = load_bundle(bundles["server"], role="server")
    client_b = load_bundle(bundles["site_b.2"], role="client")

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return context.auth_context()["x509_common_name"][0]

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.S", {"Who": grpc.unary_unary_rpc_method_handler(who)}),)
    )
    creds = grpc.ssl_server_credentials(
        [(server_b.key_pem, server_b.cert_pem)], root_certificates=server_b.ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(client_b.ca_pem, client_b.key_pem, client_b.cert_pem)
        with grpc.secure_channel(f"{client_b.server_host}:{port}", channel_creds) as channel:
            assert channel.unary_unary("/t.S/Who")(b"", timeout=10) == b"site_b.2"
    finally:
        server.stop(grace=None)
