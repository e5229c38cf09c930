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
