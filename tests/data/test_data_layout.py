"""find_sites and case pairing on real folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfms_secure.data import find_sites
from fedfms_secure.data.layout import list_cases
from fedfms_secure.errors import DataError


def _site(path: Path, images: list[str], labels: list[str]) -> Path:
    (path / "imagesTr").mkdir(parents=True)
    (path / "labelsTr").mkdir()
    for name in images:
        (path / "imagesTr" / name).write_bytes(b"")
    for name in labels:
        (path / "labelsTr" / name).write_bytes(b"")
    return path


def test_single_site_folder(tmp_path: Path) -> None:
    site = _site(tmp_path / "hospital", ["a.nii.gz"], ["a.nii.gz"])
    assert find_sites(site) == [site]


def test_folder_of_sites_sorted_and_others_ignored(tmp_path: Path) -> None:
    b = _site(tmp_path / "b_site", ["x.png"], ["x.png"])
    a = _site(tmp_path / "a_site", ["x.png"], ["x.png"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.md").write_text("hi")
    assert find_sites(tmp_path) == [a, b]


def test_empty_or_missing_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="imagesTr"):
        find_sites(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        find_sites(tmp_path / "nowhere")


def test_pairs_by_name_nnunet_channels_and_hidden_files(tmp_path: Path) -> None:
    site = _site(
        tmp_path / "s",
        ["a.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "._a.nii.gz", "c.nii", "notes.txt"],
        ["a.nii.gz", "b.nii.gz", "._a.nii.gz"],
    )
    cases = list_cases(site)
    assert [c.name for c in cases] == ["a", "b", "c"]
    assert cases[1].image.name == "b_0000.nii.gz" and cases[1].label.name == "b.nii.gz"
    assert cases[2].label is None


def test_missing_labels_folder(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match="labelsTr"):
        list_cases(tmp_path)


@pytest.mark.parametrize(
    ("images", "labels", "first", "second"),
    [
        (["a.nii.gz", "a.png"], ["a.nii.gz"], "a.nii.gz", "a.png"),  # two formats of one case
        (["b.nii.gz", "b_0000.nii.gz"], ["b.nii.gz"], "b.nii.gz", "b_0000.nii.gz"),  # MSD and nnU-Net names
        (["a.nii.gz"], ["a.nii", "a.nii.gz"], "a.nii", "a.nii.gz"),  # two labels of one case
    ],
)
def test_two_files_of_one_case_are_refused(
    tmp_path: Path, images: list[str], labels: list[str], first: str, second: str
) -> None:
    site = _site(tmp_path / "s", images, labels)
    with pytest.raises(DataError, match="are both case") as err:
        list_cases(site)
    message = str(err.value)
    assert f"/{first} and " in message and f"/{second} are both case" in message
