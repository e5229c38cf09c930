"""``fedfms-secure status`` with a passphrase-protected bundle, against the real server over mutual TLS.

The federation's private keys are encrypted at rest (``keys init --passphrase-file``); the server
daemon runs in a thread with the passphrase, and ``status`` opens the site's bundle only with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfms_secure.cli import main

from federation_kit import provision_sites, running_server

PASS = b"correct horse battery staple"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("status")
    (root / "pass.txt").write_bytes(PASS + b"\n")
    provision_sites(root, ["a", "b"], federation="st", he_dealer=True, passphrase=PASS)
    with running_server(root / "server", root / "state", rounds=2, passphrase_file=root / "pass.txt") as address:
        yield root, address


def test_status_opens_a_protected_bundle_with_its_passphrase_and_shows_the_key_epoch(
    federation: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, address = federation
    argv = ["status", "--server", address, "--keys", str(root / "a"), "--passphrase-file", str(root / "pass.txt")]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["federation"] == "st" and printed["key"]["epoch"] == 1
    fingerprint = printed["key"]["fingerprint"]
    assert len(fingerprint) >= 16

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "federation st: round 1 of 2" in out
    assert f"CKKS key: epoch 1, fingerprint {fingerprint[:16]}, from round 1, made by the provisioning host" in out


def test_status_without_or_with_a_wrong_passphrase_names_the_file(
    federation: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, address = federation
    base = ["status", "--server", address, "--keys", str(root / "a")]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert str(root / "a" / "tls.key") in err and "--passphrase-file" in err

    (root / "wrong.txt").write_bytes(b"not the passphrase\n")
    assert main([*base, "--passphrase-file", str(root / "wrong.txt")]) == 1
    err = capsys.readouterr().err
    assert f"wrong passphrase for {root / 'a' / 'tls.key'}" in err and "--passphrase-file" in err

    assert main([*base, "--passphrase-file", str(root / "missing.txt")]) == 1
    assert f"passphrase file {root / 'missing.txt'} does not exist" in capsys.readouterr().err


def test_the_headline_counts_rounds_from_one_and_says_when_the_run_is_done() -> None:
    from fedfms_secure.commands.status import headline
    from fedfms_secure.protocol import PHASE_COMMIT, PHASE_DONE, Status

    assert headline(Status("f", 0, 3, PHASE_COMMIT, (), 0.0)) == "federation f: round 1 of 3, phase commit"
    assert headline(Status("f", 2, 3, PHASE_COMMIT, (), 0.0)) == "federation f: round 3 of 3, phase commit"
    assert headline(Status("f", 3, 3, PHASE_DONE, (), 0.0)) == "federation f: finished, all 3 rounds done"
