"""A site seals the CKKS key only to envelope keys the federation CA certified.

The attack replayed here: whoever can write site a's bundle replaces site b's envelope public key
in a's (unsigned) manifest.json by their own X25519 key, hoping that a's next `keys he-init` /
`keys rotate-he` seals the federation's CKKS secret key to them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fedfms_secure.cli import main
from fedfms_secure.errors import KeyMaterialError
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import load_bundle, sealing_keys
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.keycheck import show_federation, verify_bundle
from fedfms_secure.keys.provision import add_client, init_federation
from fedfms_secure.keys.rules import BundleProblem

SITES = {"a", "b", "c"}


@pytest.fixture()
def fed(tmp_path: Path) -> dict[str, object]:
    made_at_c = pki.new_envelope_key()  # site c made its own envelope key (`keys envelope-key`)
    prov = init_federation(tmp_path / "prov", federation="x", server_host="localhost", clients=sorted(SITES),
                           he_dealer=False, envelope_publics={"c": pki.raw_public(made_at_c)})
    bundle = export_bundle("client", "a", prov, tmp_path / "a")
    real_b = pki.raw_public(pki.envelope_key_from_pem((prov / "clients" / "b" / "envelope.key").read_bytes(),
                                                      source="b"))
    return {"prov": prov, "a": bundle, "real_b": real_b, "c": pki.raw_public(made_at_c), "tmp": tmp_path}


def _plant_attacker_key(bundle: Path) -> bytes:
    attacker = pki.raw_public(pki.new_envelope_key())
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["envelope_keys"]["b"] = attacker.hex()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return attacker


def test_a_planted_envelope_key_is_refused_at_load_and_by_verify(fed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = fed["a"]
    assert load_bundle(bundle, role="client").envelope_keys["b"] == fed["real_b"]
    _plant_attacker_key(bundle)
    with pytest.raises(BundleProblem, match=r"lists an envelope key for site 'b' that the federation CA did not "
                                            r"certify.*REFUSING to seal to it") as info:
        load_bundle(bundle, role="client")
    assert info.value.as_dict() in verify_bundle(bundle)["problems"]
    assert main(["keys", "verify", str(bundle)]) == 1  # it exited 0 before
    assert "did not certify" in capsys.readouterr().out


def test_a_planted_key_after_load_is_refused_before_sealing(fed: dict) -> None:
    bundle = load_bundle(fed["a"], role="client")
    assert sealing_keys(bundle, SITES) == {"b": fed["real_b"], "c": fed["c"]}
    # the manifest changed on disk while the site runs (he-init / rotate-he / re-sealing read it again)
    _plant_attacker_key(fed["a"])
    with pytest.raises(BundleProblem, match="did not certify"):
        sealing_keys(bundle, SITES)


def test_a_key_changed_in_memory_is_refused_before_sealing(fed: dict) -> None:
    bundle = load_bundle(fed["a"], role="client")
    forged = dataclasses.replace(bundle, envelope_keys={**bundle.envelope_keys,
                                                        "b": pki.raw_public(pki.new_envelope_key())})
    with pytest.raises(KeyMaterialError, match="REFUSING to seal"):
        sealing_keys(forged, SITES)


def test_a_missing_or_foreign_peer_certificate_is_refused(fed: dict) -> None:
    missing = Path(shutil.copytree(fed["a"], fed["tmp"] / "missing"))
    (missing / "peers" / "b.crt").unlink()
    with pytest.raises(BundleProblem, match=r"b.crt is missing: the envelope key .* is not certified"):
        load_bundle(missing, role="client")
    # a certificate of another federation (whose CA the attacker runs) for b with the attacker's key
    evil = init_federation(fed["tmp"] / "evil", federation="x", server_host="localhost", clients=["b"],
                           he_dealer=False)
    foreign = Path(shutil.copytree(fed["a"], fed["tmp"] / "foreign"))
    shutil.copy(evil / "clients" / "b" / "tls.crt", foreign / "peers" / "b.crt")
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["envelope_keys"]["b"] = pki.envelope_key_of(pki.load_cert(evil / "clients" / "b" / "tls.crt")).hex()
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleProblem, match="was not issued by this federation's CA"):
        load_bundle(foreign, role="client")
    assert not verify_bundle(foreign)["ok"]


def test_site_made_and_late_sites_keys_keep_working(fed: dict) -> None:
    prov = fed["prov"]
    made_at_d = pki.new_envelope_key()
    add_client(prov, "d", envelope_public=pki.raw_public(made_at_d))
    export_bundle("client", "a", prov, fed["a"], update=True)
    bundle = load_bundle(fed["a"], role="client")
    assert sealing_keys(bundle, SITES | {"d"}) == {"b": fed["real_b"], "c": fed["c"], "d": pki.raw_public(made_at_d)}
    assert verify_bundle(fed["a"])["ok"]


def test_show_prints_each_sites_envelope_key_fingerprint(fed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    parties = {p["party"]: p for p in show_federation(fed["prov"])["parties"]}
    assert parties["b"]["envelope_key_sha256"] == hashlib.sha256(fed["real_b"]).hexdigest()
    assert parties["c"]["envelope_key_sha256"] == hashlib.sha256(fed["c"]).hexdigest()
    assert "envelope_key_sha256" not in parties["server"]
    assert main(["keys", "show", "--from", str(fed["prov"])]) == 0
    assert f"envelope key sha256 {hashlib.sha256(fed['c']).hexdigest()}" in capsys.readouterr().out
