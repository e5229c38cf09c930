"""A site's CKKS contexts by key epoch in BUNDLE/he/ (real TenSEAL contexts, real bundles)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedfms_secure.he.ckks import load_context, new_secret_context, serialize_params_only, serialize_site_context
from fedfms_secure.keys.hestore import HeStore, site_key
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.he.packing import fit_params
from fedfms_secure.errors import KeyMaterialError

PARAMS = fit_params(bound=1.0, sites=2, rounds=3)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hestore")
    out = {}
    for mode, dealer in (("site", False), ("dealer", True)):
        prov = init_federation(root / f"prov-{mode}", federation="hs", server_host="localhost", clients=["a", "b"],
                               params=PARAMS, he_dealer=dealer)
        out[mode] = export_bundle("client", "a", prov, root / f"a-{mode}")
    return out


@pytest.fixture
def bundle(bundles, tmp_path) -> Path:
    return Path(shutil.copytree(bundles["site"], tmp_path / "a"))


def context() -> bytes:
    return serialize_site_context(new_secret_context(PARAMS))


def test_a_bundle_without_a_dealer_has_no_key_until_one_is_stored(bundle):
    b = load_bundle(bundle, role="client")
    assert not b.has_he_secret and site_key(b) is None
    key = HeStore(bundle).put(1, context())
    held = site_key(load_bundle(bundle, role="client"))
    assert (held.epoch, held.fingerprint) == (1, key.fingerprint) and held.context.has_secret_key()
    assert oct(key.path.stat().st_mode & 0o777) == "0o600"
    assert oct((bundle / "he" / "current.json").stat().st_mode & 0o777) == "0o600"


def test_a_dealer_bundle_uses_its_own_context_until_a_rotation(bundles, tmp_path):
    bundle = Path(shutil.copytree(bundles["dealer"], tmp_path / "a"))
    b = load_bundle(bundle, role="client")
    held = site_key(b)
    assert (held.epoch, held.fingerprint) == (0, b.fingerprint)
    rotated = HeStore(bundle).put(2, context())
    assert site_key(b).fingerprint == rotated.fingerprint != b.fingerprint


def test_pending_key_is_promoted_or_discarded(bundle):
    store = HeStore(bundle)
    first = store.put(1, context())
    pending = store.put(2, context(), pending=True)
    assert store.current() == first and store.pending() == pending and store.find(pending.fingerprint) == pending
    store.discard_pending()
    assert store.pending() is None and not pending.path.exists() and store.current() == first
    again = store.put(2, context(), pending=True)
    with pytest.raises(KeyMaterialError, match="holds no pending key"):
        store.promote(pending.fingerprint)  # the discarded one
    assert store.promote(again.fingerprint) == again
    assert store.promote(again.fingerprint) == again  # promoted twice (daemon and command): no harm
    assert sorted(p.name for p in store.folder.glob("epoch-*.ctx")) == ["epoch-2.ctx"]


def test_a_newer_key_supersedes_older_ones(bundle):
    store = HeStore(bundle)
    store.put(1, context())
    store.put(2, context())
    store.put(3, context())
    assert store.current().epoch == 3
    assert [p.name for p in store.folder.glob("epoch-*.ctx")] == ["epoch-3.ctx"]


def test_damaged_store_is_named_with_what_to_do(bundle):
    store = HeStore(bundle)
    key = store.put(1, context())
    key.path.write_bytes(context())  # replaced by another context
    key.path.chmod(0o600)
    with pytest.raises(KeyMaterialError, match="the file was replaced; delete the he/ folder"):
        store.load(store.current())
    key.path.unlink()
    with pytest.raises(KeyMaterialError, match=r"epoch-1.ctx \(key epoch 1\) is missing"):
        store.load(store.current())
    (store.folder / "current.json").write_text("{not json")
    with pytest.raises(KeyMaterialError, match="current.json is unreadable or not JSON"):
        store.current()
    (store.folder / "current.json").write_text(json.dumps({"current": {"epoch": 0, "fingerprint": "x"}}))
    with pytest.raises(KeyMaterialError, match="the current entry .* is not an epoch and a fingerprint"):
        store.current()


def test_only_a_full_context_is_stored(bundle):
    keyless = serialize_params_only(load_context(context(), source="test"))
    with pytest.raises(KeyMaterialError, match="has no secret key"):
        HeStore(bundle).put(1, keyless)
    with pytest.raises(KeyMaterialError, match="epochs count from 1"):
        HeStore(bundle).put(0, context())
    assert HeStore(bundle).current() is None
