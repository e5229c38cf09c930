"""Revocations outlive the server bundle's ``crl.pem``: the server keeps them in its state folder.

The server is ``server.daemon.serve`` in a thread, reached over real gRPC with mutual TLS by each
site's bundle; the operator's steps run through the CLI. The server is restarted from a bundle
whose ``crl.pem`` was deleted, then from one whose ``crl.pem`` is an older (validly signed) list.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest

from fedfms_secure.cli import main
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.errors import ConfigError
from fedfms_secure.keys.revocation import PERSISTED, RevocationList
from fedfms_secure.v1 import federation_pb2 as pb

from federation_kit import running_server, site_stub


def _status(address: str, bundle: Path) -> pb.GetStatusResponse:
    channel, stub = site_stub(address, bundle)
    with channel:
        return stub.GetStatus(pb.GetStatusRequest(), timeout=10)


def _refused(address: str, bundle: Path) -> str:
    with pytest.raises(grpc.RpcError) as info:
        _status(address, bundle)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    return info.value.details()


def _cli(*argv: str) -> None:
    assert main(["--log-level", "ERROR", *argv]) == 0


class _Records(logging.Handler):
    """Keeps the records of the logger it is added to (the CLI's logging does not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_restart_without_or_with_an_older_crl_still_refuses_revoked_sites(tmp_path: Path) -> None:
    prov, server, state = tmp_path / "prov", tmp_path / "server", tmp_path / "state"
    _cli("keys", "init", "--out", str(prov), "--federation", "pr", "--server-host", "localhost",
         "--clients", "a,b,c", "--max-rounds", "2")
    _cli("keys", "export", "server", "--from", str(prov), "--out", str(server))
    for name in "abc":
        _cli("keys", "export", "client", name, "--from", str(prov), "--out", str(tmp_path / name))
    b_serial = pki.load_cert(tmp_path / "b" / "tls.crt").serial_number
    c_serial = pki.load_cert(tmp_path / "c" / "tls.crt").serial_number

    # b is revoked while the server runs: the server learns it from the reloaded crl.pem
    with running_server(server, state, rounds=2) as address:
        assert _status(address, tmp_path / "b").federation == "pr"
        _cli("keys", "revoke", "b", "--from", str(prov), "--reason", "key-compromise", "--server-bundle", str(server))
        assert "reason: key-compromise" in _refused(address, tmp_path / "b")
    record = json.loads((state / PERSISTED).read_text())
    assert record["crl_number"] == 1
    assert [(r["serial"], r["site"], r["reason"]) for r in record["revoked"]] == [
        (format(b_serial, "x"), "b", "key-compromise")]
    first_crl = (server / "crl.pem").read_bytes()

    # restarted from a bundle without crl.pem (the bundle still lists b): b stays refused, a is accepted
    (server / "crl.pem").unlink()
    assert "b" in load_bundle(server, role="server").clients
    logged, logger = _Records(), logging.getLogger("fedfms_secure.server")
    level = logger.level
    logger.addHandler(logged)
    logger.setLevel(logging.WARNING)  # the CLI calls above set fedfms_secure's level to ERROR
    try:
        with running_server(server, state, rounds=2) as address:
            message = _refused(address, tmp_path / "b")
            assert "'b'" in message and f"{b_serial:x}" in message and "revoked on" in message
            assert "reason: key-compromise" in message and "no longer part of the federation" in message
            assert _status(address, tmp_path / "a").federation == "pr"
            assert _status(address, tmp_path / "c").federation == "pr"
    finally:
        logger.removeHandler(logged)
        logger.setLevel(level)
    assert any(r.levelno == logging.WARNING and "the bundle has no revocation list" in r.getMessage()
               for r in logged.records)

    # c is revoked next (CRL number 2) and the server sees it at its start
    _cli("keys", "revoke", "c", "--from", str(prov), "--reason", "cessation-of-operation", "--server-bundle", str(server))
    with running_server(server, state, rounds=2) as address:
        assert "reason: cessation-of-operation" in _refused(address, tmp_path / "c")
    assert json.loads((state / PERSISTED).read_text())["crl_number"] == 2

    # restarted from a bundle holding the older list (number 1, validly signed): it lowers nothing
    (server / "crl.pem").write_bytes(first_crl)
    with running_server(server, state, rounds=2) as address:
        assert f"{c_serial:x}" in (message := _refused(address, tmp_path / "c"))
        assert "reason: cessation-of-operation" in message
        assert "reason: key-compromise" in _refused(address, tmp_path / "b")
        assert _status(address, tmp_path / "a").federation == "pr"
    record = json.loads((state / PERSISTED).read_text())
    assert record["crl_number"] == 2 and {r["site"] for r in record["revoked"]} == {"b", "c"}


def test_the_record_is_the_union_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    prov = tmp_path / "prov"
    _cli("keys", "init", "--out", str(prov), "--federation", "pu", "--server-host", "localhost", "--clients", "a,b")
    ca_pem = (prov / "ca" / "ca.crt").read_bytes()
    a_pem = (prov / "clients" / "a" / "tls.crt").read_bytes()
    b_pem = (prov / "clients" / "b" / "tls.crt").read_bytes()
    b_serial = pki.load_cert(prov / "clients" / "b" / "tls.crt").serial_number
    record = tmp_path / "state" / PERSISTED
    record.parent.mkdir()

    # no list anywhere yet: nothing revoked, nothing written
    RevocationList(tmp_path / "none.pem", ca_pem, persist=record).check_pem(a_pem)
    assert not record.exists()

    # the record knows b (an entry the CA's list lacks), the list revokes a: both are refused
    record.write_text(json.dumps({"crl_number": 0, "revoked": [
        {"serial": format(b_serial, "x"), "date": "2024-05-01T10:00:00+00:00", "reason": "superseded",
         "site": "", "removes_site": False}]}))
    _cli("keys", "revoke", "a", "--from", str(prov))
    revocations = RevocationList(prov / "ca" / "crl.pem", ca_pem, persist=record)
    with pytest.raises(Exception, match="reason: key-compromise"):
        revocations.check_pem(a_pem)
    with pytest.raises(Exception, match=r"'b' .* revoked on 2024-05-01 10:00 UTC, reason: superseded"):
        revocations.check_pem(b_pem)
    assert revocations.number == 1 and set(revocations.removed_sites()) == {"a"}
    saved = json.loads(record.read_text())
    assert saved["crl_number"] == 1 and len(saved["revoked"]) == 2
    # the record alone, without any list, refuses both
    alone = RevocationList(tmp_path / "none.pem", ca_pem, persist=record)
    assert alone.number == 1 and alone.revoked(b_serial) is not None
    with pytest.raises(Exception, match="reason: key-compromise"):
        alone.check_pem(a_pem)

    record.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"revocation record {record} is unreadable or damaged.*restore it"):
        RevocationList(prov / "ca" / "crl.pem", ca_pem, persist=record)
