"""The synthetic federation: MSD layout, determinism, non-IID sites, safe re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfms_secure.data import find_sites, synth_federation
from fedfms_secure.data import synth as synth_module
from fedfms_secure.errors import ConfigError, DataError


def _site_stats(site: Path) -> tuple[float, float]:
    values = [nib.load(p).get_fdata() for p in sorted((site / "imagesTr").iterdir())]
    return float(np.mean([v.mean() for v in values])), float(np.mean([v.std() for v in values]))


def test_writes_msd_layout(tmp_path: Path) -> None:
    shape = (32, 32, 12)
    sites = synth_federation(tmp_path, sites=3, seed=0, shape=shape)
    assert sites == [tmp_path / f"site_{k}" for k in (1, 2, 3)]
    for site in sites:
        meta = json.loads((site / "dataset.json").read_text())
        assert meta["labels"] == {"0": "background", "1": "organ"}
        assert "0" in meta["modality"]
        images = sorted(p.name for p in (site / "imagesTr").iterdir())
        labels = sorted(p.name for p in (site / "labelsTr").iterdir())
        assert images == labels
        assert 3 <= meta["numTraining"] == len(images) <= 8
        assert meta["training"][0] == {
            "image": f"./imagesTr/{images[0]}",
            "label": f"./labelsTr/{images[0]}",
        }
        for name in images:
            image = nib.load(site / "imagesTr" / name)
            label = np.asarray(nib.load(site / "labelsTr" / name).dataobj)
            assert image.shape == label.shape == shape
            assert set(np.unique(label)) == {0, 1}
            per_slice = label.reshape(-1, shape[2]).any(axis=0)
            assert per_slice.any() and not per_slice.all(), "want organ slices and empty slices"
            organ, rest = image.get_fdata()[label > 0], image.get_fdata()[label == 0]
            assert organ.mean() > rest.mean(), "the organ should be brighter than its background"


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = synth_federation(tmp_path / "a", sites=2, seed=3, shape=(24, 24, 6))
    b = synth_federation(tmp_path / "b", sites=2, seed=3, shape=(24, 24, 6))
    c = synth_federation(tmp_path / "c", sites=2, seed=4, shape=(24, 24, 6))
    files = sorted(p.relative_to(a[0].parent) for p in a[0].parent.rglob("*") if p.is_file())
    assert len(files) > 6
    for rel in files:
        assert (a[0].parent / rel).read_bytes() == (b[0].parent / rel).read_bytes(), rel
    first = "imagesTr/case_000.nii.gz"
    assert (a[0] / first).read_bytes() != (c[0] / first).read_bytes()


def test_sites_are_non_iid(tmp_path: Path) -> None:
    sites = synth_federation(tmp_path, sites=3, seed=1, shape=(32, 32, 8))
    counts = [json.loads((s / "dataset.json").read_text())["numTraining"] for s in sites]
    assert len(set(counts)) == 3, counts
    stats = [_site_stats(s) for s in sites]
    means = sorted(m for m, _ in stats)
    assert min(b - a for a, b in zip(means, means[1:])) > 20.0, stats
    spacings = {nib.load(s / "imagesTr" / "case_000.nii.gz").header.get_zooms() for s in sites}
    assert len(spacings) == 3


def test_rerun_replaces_own_output_but_not_foreign_folders(tmp_path: Path) -> None:
    synth_federation(tmp_path, sites=1, seed=0, shape=(16, 16, 4))
    (tmp_path / "site_1" / "imagesTr" / "stale.nii.gz").write_bytes(b"x")
    synth_federation(tmp_path, sites=1, seed=0, shape=(16, 16, 4))
    assert not (tmp_path / "site_1" / "imagesTr" / "stale.nii.gz").exists()
    (tmp_path / "site_2").mkdir()
    (tmp_path / "site_1" / "imagesTr" / "stale.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="site_2.*Nothing was written"):
        synth_federation(tmp_path, sites=2, seed=0, shape=(16, 16, 4))
    # the refusal came before any change: site_1 was not wiped or rewritten
    assert (tmp_path / "site_1" / "imagesTr" / "stale.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_1", "site_2"]


def test_rerun_with_fewer_sites_removes_own_extra_sites_only(tmp_path: Path) -> None:
    synth_federation(tmp_path, sites=3, seed=0, shape=(16, 16, 4))
    foreign = tmp_path / "site_9"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "labelsTr").mkdir()
    sites = synth_federation(tmp_path, sites=2, seed=0, shape=(16, 16, 4))
    assert not (tmp_path / "site_3").exists()
    assert find_sites(tmp_path) == sites + [foreign]  # the user's own folder is left alone


def test_interrupted_run_leaves_no_half_written_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = synth_federation(tmp_path, sites=2, seed=0, shape=(16, 16, 4))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real, calls = synth_module._write_site, []

    def crash_on_second_site(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth_module, "_write_site", crash_on_second_site)
    with pytest.raises(KeyboardInterrupt):
        synth_federation(tmp_path, sites=3, seed=5, shape=(16, 16, 4))
    assert len(calls) == 2
    # the previous output is untouched and nothing half-written is visible
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_1", "site_2"]
    monkeypatch.setattr(synth_module, "_write_site", real)
    # a crash that even skipped the clean-up (kill -9) leaves only the hidden staging folder,
    # which find_sites ignores and the next run removes
    (tmp_path / ".fedfms-synth-staging" / "site_1" / "imagesTr").mkdir(parents=True)
    assert find_sites(tmp_path) == first
    assert synth_federation(tmp_path, sites=3, seed=5, shape=(16, 16, 4)) == find_sites(tmp_path)
    assert not (tmp_path / ".fedfms-synth-staging").exists()


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        synth_federation(tmp_path, sites=0)
    with pytest.raises(ConfigError):
        synth_federation(tmp_path, shape=(8, 8, 2))


def test_scanner_shifts_survive_preprocessing(tmp_path: Path) -> None:
    """Gain and offset vanish in the percentile scaling; curve, contrast, noise, bias and blur must not."""
    from fedfms_secure.data import load_site

    sites = synth_federation(tmp_path, sites=3, seed=2, shape=(32, 32, 8))
    profiles = [json.loads((s / "dataset.json").read_text())["scanner"] for s in sites]
    for key in ("gamma", "contrast", "gain", "offset", "noise", "bias", "blur"):
        assert len({round(p[key], 6) for p in profiles}) == 3, key
    assert all(0.7 <= p["contrast"] <= 1.3 for p in profiles)
    steps = []
    for site in sites:
        data = load_site(site, image_size=32, val_fraction=0.0, keep_empty_every=0)
        images, labels = data.train.images.float(), data.train.labels.bool()
        steps.append(float(images[labels].mean() - images[~labels & (images > 0.05)].mean()))
    # the organ's step above the surrounding tissue differs between sites after normalisation
    assert max(steps) - min(steps) > 0.03, steps


def test_named_sites_match_the_names_of_keys_init(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fedfms_secure", "data", "synth", "--out", str(tmp_path / "d"),
                           "--names", "hosp_a,hosp_b"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["hosp_a", "hosp_b"]
    assert [Path(line).name for line in done.stdout.split()] == ["hosp_a", "hosp_b"]
    assert len(find_sites(tmp_path / "d" / "hosp_a")) == 1
    for bad in (["a", "a"], ["../x"], [".hidden"], []):
        with pytest.raises(ConfigError, match="distinct plain folder names"):
            synth_federation(tmp_path / "e", names=bad)
