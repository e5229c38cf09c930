"""The demo's report survives a site that has nothing to score (its Dice is NaN)."""

from __future__ import annotations

import json
import math

from fedfms_secure.report import build_report
from fedfms_secure.server.store import StateStore


def _record(site: str, dice: float) -> dict:
    return {"site": site, "round": 0, "dice": dice, "dice_local": dice, "bytes_up": 10.0, "bytes_down": 20.0,
            "contributed": 1.0, "dice_std": 0.0, "iou": dice, "iou_std": 0.0, "hd95": 3.0, "hd95_std": 0.0}


def test_report_leaves_out_a_site_without_scores(tmp_path):
    store = StateStore(tmp_path / "server")
    store.append_record("metrics.jsonl", _record("a", 0.6))
    store.append_record("metrics.jsonl", _record("b", math.nan))
    lines = (tmp_path / "server" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["dice"] is None  # strict JSON: NaN is stored as null
    assert "NaN" not in lines[1]

    report = build_report(tmp_path / "server", {"a": tmp_path / "a", "b": tmp_path / "b"}, {}, 1.0)
    (row,) = report["rounds"]
    assert row["dice_mean"] == 0.6 and row["dice_std"] == 0.0
    assert row["dice_local_mean"] == 0.6
    assert row["sites_reporting"] == 2
    assert report["final"]["sites"]["b"]["dice_mean"] is None
    assert report["final"]["mean"]["dice_mean"] == 0.6


def test_report_gives_epsilon_for_every_site_and_round(tmp_path):
    """b waited round 0 out (it reports round 1 only, and trained from round 1); c ran without DP."""
    from fedfms_secure.privacy.budget import append_ledger
    from fedfms_secure.privacy.site import STATE_FILE

    store = StateStore(tmp_path / "server")
    for r, site in ((0, "a"), (0, "c"), (1, "a"), (1, "b"), (1, "c")):
        store.append_record("metrics.jsonl", {**_record(site, 0.5), "round": r})
    for site in ("a", "b", "c"):
        (tmp_path / site).mkdir()
    for site in ("a", "b"):
        (tmp_path / site / STATE_FILE).write_text("{}")
    append_ledger(tmp_path / "a", {"round": 0, "epsilon": 1.5})
    append_ledger(tmp_path / "a", {"round": 1, "epsilon": 2.5})
    append_ledger(tmp_path / "b", {"round": 1, "epsilon": 1.25})
    with open(tmp_path / "server" / "metrics.jsonl", "a") as fh:
        fh.write('{"site": "a", "rou')  # cut short by a crash: left out

    report = build_report(tmp_path / "server", {s: tmp_path / s for s in "abc"}, {}, 1.0)
    assert [row["epsilon"] for row in report["rounds"]] == [
        {"a": 1.5, "b": 0.0, "c": None}, {"a": 2.5, "b": 1.25, "c": None}]
    assert [row["epsilon_max"] for row in report["rounds"]] == [1.5, 2.5]
    assert [row["sites_reporting"] for row in report["rounds"]] == [2, 3]


def test_a_final_model_worse_than_the_start_is_named() -> None:
    from fedfms_secure.report import worse_than_start

    report = {"dice_initial": 0.40, "dice_final": 0.30, "rounds": [{}, {}]}
    warning = worse_than_start(report)
    assert warning is not None and "WORSE" in warning and "0.3000 after 2 rounds, 0.4000 before" in warning
    assert worse_than_start({**report, "dice_final": 0.41}) is None
    assert worse_than_start({**report, "dice_initial": float("nan")}) is None
