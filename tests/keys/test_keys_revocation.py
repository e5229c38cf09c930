"""Revocation, TLS rotation and new sites against the real server daemon over mutual TLS.

The operator's steps run through the CLI (``keys revoke``, ``keys rotate-tls``, ``keys add-client``,
``keys export``); the server is ``server.daemon.serve`` in a thread, reached by real gRPC
channels with each site's bundle.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from fedfms_secure.cli import main
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.lifecycle import revoke
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.errors import KeyMaterialError
from fedfms_secure.keys.revocation import RevocationList
from fedfms_secure.v1 import federation_pb2 as pb
from fedfms_secure.v1 import federation_pb2_grpc as pb_grpc

from federation_kit import running_server, site_stub


def _status(stub: pb_grpc.FederationStub) -> pb.GetStatusResponse:
    return stub.GetStatus(pb.GetStatusRequest(), timeout=10)


def _refused(stub: pb_grpc.FederationStub) -> str:
    with pytest.raises(grpc.RpcError) as info:
        _status(stub)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    return info.value.details()


def _cli(*argv: str) -> None:
    assert main(["--log-level", "ERROR", *argv]) == 0


def _wait_retired(stub: pb_grpc.FederationStub, site: str) -> pb.SiteStatus:
    deadline = time.monotonic() + 10
    while True:
        sites = {s.name: s for s in _status(stub).sites}
        if sites[site].retired or time.monotonic() > deadline:
            return sites[site]
        time.sleep(0.05)


def test_revoke_rotate_and_add_client_on_a_running_server(tmp_path: Path) -> None:
    prov = tmp_path / "prov"
    _cli("keys", "init", "--out", str(prov), "--federation", "rv", "--server-host", "localhost",
         "--clients", "a,b,c", "--max-rounds", "2")
    _cli("keys", "export", "server", "--from", str(prov), "--out", str(tmp_path / "server"))
    for name in "abc":
        _cli("keys", "export", "client", name, "--from", str(prov), "--out", str(tmp_path / name))
    old_b_serial = pki.load_cert(tmp_path / "b" / "tls.crt").serial_number

    with running_server(tmp_path / "server", tmp_path / "state", rounds=2) as address:
        channels = {n: site_stub(address, tmp_path / n) for n in "abc"}
        for _, stub in channels.values():
            assert _status(stub).federation == "rv"

        # revoke b while the server runs: refused from its next call, on the same connection
        _cli("keys", "revoke", "b", "--from", str(prov), "--reason", "cessation-of-operation",
             "--server-bundle", str(tmp_path / "server"))
        message = _refused(channels["b"][1])
        assert "'b'" in message and f"{old_b_serial:x}" in message
        assert "reason: cessation-of-operation" in message and "revoked on" in message
        for name in "ac":  # the others are unaffected
            assert _status(channels[name][1]).federation == "rv"
        # the coordinator no longer waits for b
        retired = _wait_retired(channels["a"][1], "b")
        assert retired.retired and "certificate revoked (cessation-of-operation)" in retired.retired_reason

        # rotate a's certificate: the old one is refused, the new bundle is accepted without a restart
        old_a = pki.load_cert(tmp_path / "a" / "tls.crt")
        _cli("keys", "rotate-tls", "a", "--from", str(prov), "--out-bundles", str(tmp_path / "new"),
             "--server-bundle", str(tmp_path / "server"))
        new_a = pki.load_cert(tmp_path / "new" / "a" / "tls.crt")
        assert new_a.serial_number != old_a.serial_number
        assert pki.envelope_key_of(new_a) == pki.envelope_key_of(old_a)  # the envelope key stays
        message = _refused(channels["a"][1])
        assert "reason: superseded" in message and "keys rotate-tls" in message
        new_channel, new_stub = site_stub(address, tmp_path / "new" / "a")
        assert _status(new_stub).federation == "rv"
        assert not {s.name: s for s in _status(new_stub).sites}["a"].retired  # a rotation retires nobody
        new_channel.close()

        # a new site: certified by the CA, but the running server does not know it yet
        _cli("keys", "add-client", "d", "--from", str(prov))
        _cli("keys", "export", "client", "d", "--from", str(prov), "--out", str(tmp_path / "d"))
        d_channel, d_stub = site_stub(address, tmp_path / "d")
        assert "'d' is not a site of federation" in _refused(d_stub)
        d_channel.close()
        for channel, _ in channels.values():
            channel.close()

    # the operator re-exports the server bundle and restarts the server
    _cli("keys", "export", "server", "--from", str(prov), "--out", str(tmp_path / "server"), "--update")
    assert load_bundle(tmp_path / "server", role="server").clients == ("a", "c", "d")
    with running_server(tmp_path / "server", tmp_path / "state", rounds=2) as address:
        d_channel, d_stub = site_stub(address, tmp_path / "d")
        assert "d" in {s.name for s in _status(d_stub).sites}
        b_channel, b_stub = site_stub(address, tmp_path / "b")
        assert "reason: cessation-of-operation" in _refused(b_stub)  # still revoked after the restart
        old_a_channel, old_a_stub = site_stub(address, tmp_path / "a")
        assert "superseded" in _refused(old_a_stub)
        for channel in (d_channel, b_channel, old_a_channel):
            channel.close()


def _fed(tmp_path: Path) -> tuple[Path, Path]:
    prov = init_federation(tmp_path / "prov", federation="r", server_host="localhost", clients=["a", "b"],
                           he_dealer=False)
    return prov, export_bundle("server", None, prov, tmp_path / "server")


def test_revocation_list_is_trusted_by_its_signature_only(tmp_path: Path) -> None:
    prov, server = _fed(tmp_path)
    ca_pem = (server / "ca.crt").read_bytes()
    revoke(prov, "a", reason="key-compromise")
    good = (prov / "ca" / "crl.pem").read_bytes()
    a_pem = (prov / "clients" / "a" / "tls.crt").read_bytes()
    b_pem = (prov / "clients" / "b" / "tls.crt").read_bytes()

    # a list signed by another CA is refused at start, naming the file
    other, _ = _fed(tmp_path / "other")
    revoke(other, "b")
    (server / "crl.pem").write_bytes((other / "ca" / "crl.pem").read_bytes())
    with pytest.raises(KeyMaterialError, match=r"crl.pem is not signed by this federation's CA"):
        RevocationList(server / "crl.pem", ca_pem)

    (server / "crl.pem").write_bytes(good)
    revocations = RevocationList(server / "crl.pem", ca_pem)
    assert set(revocations.removed_sites()) == {"a"}
    with pytest.raises(Exception, match="key-compromise"):
        revocations.check_pem(a_pem)
    revocations.check_pem(b_pem)  # not revoked

    # while running: a forged, a garbled or an older list does not un-revoke anything
    for replacement in ((other / "ca" / "crl.pem").read_bytes(), b"garbage"):
        (server / "crl.pem").write_bytes(replacement)
        assert revocations.refresh() is False
        with pytest.raises(Exception, match="key-compromise"):
            revocations.check_pem(a_pem)
    revoke(prov, "b", reason="superseded")
    (server / "crl.pem").write_bytes((prov / "ca" / "crl.pem").read_bytes())
    assert revocations.refresh() is True and revocations.number == 2
    with pytest.raises(Exception, match="superseded"):
        revocations.check_pem(b_pem)
    (server / "crl.pem").write_bytes(good)  # CRL number 1: a rollback
    assert revocations.refresh() is False
    with pytest.raises(Exception, match="superseded"):
        revocations.check_pem(b_pem)
    (server / "crl.pem").unlink()
    assert revocations.refresh() is False
    with pytest.raises(Exception, match="key-compromise"):
        revocations.check_pem(a_pem)


def test_revoke_refusals_name_the_problem(tmp_path: Path) -> None:
    prov, server = _fed(tmp_path)
    assert main(["keys", "revoke", "zed", "--from", str(prov)]) == 1
    assert main(["keys", "revoke", "a", "--from", str(tmp_path / "nowhere")]) == 1
    _cli("keys", "revoke", "a", "--from", str(prov))
    assert main(["keys", "revoke", "a", "--from", str(prov)]) == 1  # already revoked
    assert main(["keys", "rotate-tls", "a", "--from", str(prov)]) == 1  # a revoked site gets nothing new
    assert main(["keys", "export", "client", "a", "--from", str(prov), "--out", str(tmp_path / "a")]) == 1
    assert main(["keys", "add-client", "a", "--from", str(prov)]) == 1  # a revoked name stays out
    # export server copies the list; the revoked site is no longer one of the federation's sites
    fresh = export_bundle("server", None, prov, tmp_path / "server2")
    assert (fresh / "crl.pem").read_bytes() == (prov / "ca" / "crl.pem").read_bytes()
    assert load_bundle(fresh, role="server").clients == ("b",)
    assert set(json.loads((fresh / "manifest.json").read_text())["envelope_keys"]) == {"b"}
