"""The demo's report: scores from the sites' own folders, reports and bytes from the server's.

The server's ``metrics.jsonl`` holds only what the server knows (who reported, contributed, bytes);
each site's ``STATE/metrics.jsonl`` holds its scores. The report joins them.
"""

from __future__ import annotations

import json
import math
import os
import stat

from fedfms_secure.report import build_report
from fedfms_secure.server.checks import check_metrics
from fedfms_secure.server.store import StateStore
from fedfms_secure.site.metrics import METRICS_FILE, append_metrics, read_metrics


def _known(site: str, round_: int = 0) -> dict:
    """What a site sends the server (checked as the server checks it)."""
    known = {"contributed": 1.0, "bytes_up": 10.0, "bytes_down": 20.0}
    check_metrics(known)
    return {"site": site, "round": round_, **known}


def _scores(site: str, dice: float, round_: int = 0) -> dict:
    """What a site keeps in its own folder."""
    return {"site": site, "round": round_, "dice": dice, "dice_local": dice, "bytes_up": 10.0, "bytes_down": 20.0,
            "contributed": 1.0, "dice_std": 0.0, "iou": dice, "iou_std": 0.0, "hd95": 3.0, "hd95_std": 0.0,
            "epsilon": 1.0, "epsilon_unit": "patient"}


def test_report_leaves_out_a_site_without_scores(tmp_path):
    store = StateStore(tmp_path / "server")
    for site, dice in (("a", 0.6), ("b", math.nan)):
        store.append_record("metrics.jsonl", _known(site))
        (tmp_path / site).mkdir()
        append_metrics(tmp_path / site, _scores(site, dice))
    line = (tmp_path / "b" / METRICS_FILE).read_text().splitlines()[0]
    assert json.loads(line)["dice"] is None  # strict JSON: NaN is stored as null
    assert "NaN" not in line

    report = build_report(tmp_path / "server", {"a": tmp_path / "a", "b": tmp_path / "b"}, {}, 1.0)
    (row,) = report["rounds"]
    assert row["dice_mean"] == 0.6 and row["dice_std"] == 0.0
    assert row["dice"] == {"a": 0.6, "b": None}
    assert row["dice_local_mean"] == 0.6
    assert row["sites_reporting"] == 2
    assert (row["bytes_up_total"], row["bytes_down_total"]) == (20.0, 40.0)
    assert report["final"]["sites"]["b"]["dice_mean"] is None
    assert report["final"]["mean"]["dice_mean"] == 0.6


def test_report_reads_scores_from_the_site_folders_only(tmp_path):
    """The same table whatever the server's file says about scores: it has none to say."""
    store = StateStore(tmp_path / "server")
    for r, (a, b) in enumerate(((0.4, 0.5), (0.6, 0.8))):
        for site, dice in (("a", a), ("b", b)):
            (tmp_path / site).mkdir(exist_ok=True)
            append_metrics(tmp_path / site, {**_scores(site, dice, r), "dice_local": dice - 0.1})
            store.append_record("metrics.jsonl", _known(site, r))
    server_lines = (tmp_path / "server" / "metrics.jsonl").read_text()
    assert "dice" not in server_lines and "iou" not in server_lines and "hd95" not in server_lines

    report = build_report(tmp_path / "server", {"a": tmp_path / "a", "b": tmp_path / "b"}, {}, 1.0)
    assert [row["round"] for row in report["rounds"]] == [1, 2]
    assert [row["dice"] for row in report["rounds"]] == [{"a": 0.4, "b": 0.5}, {"a": 0.6, "b": 0.8}]
    assert [row["dice_mean"] for row in report["rounds"]] == [0.45, 0.7]
    assert [round(row["dice_local_mean"], 6) for row in report["rounds"]] == [0.35, 0.6]
    assert report["dice_final"] == 0.7
    assert report["final"]["sites"]["b"] == {"round": 2, "dice_mean": 0.8, "dice_std": 0.0, "iou_mean": 0.8,
                                             "iou_std": 0.0, "hd95_mean": 3.0, "hd95_std": 0.0}
    # without the site folders' records there is nothing to score: the server's file holds no Dice
    for site in ("a", "b"):
        os.unlink(tmp_path / site / METRICS_FILE)
    bare = build_report(tmp_path / "server", {"a": tmp_path / "a", "b": tmp_path / "b"}, {}, 1.0)
    assert [row["sites_reporting"] for row in bare["rounds"]] == [2, 2]
    assert all(math.isnan(row["dice_mean"]) and row["dice"] == {} for row in bare["rounds"])
    assert bare["final"]["sites"] == {}


def test_site_metrics_file_is_private_and_survives_a_cut_line(tmp_path):
    append_metrics(tmp_path, _scores("a", 0.5, 0))
    assert stat.S_IMODE(os.stat(tmp_path / METRICS_FILE).st_mode) == 0o600
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"site": "a", "rou')  # cut short by a crash
    os.chmod(tmp_path / METRICS_FILE, 0o644)
    append_metrics(tmp_path, _scores("a", 0.7, 1))
    assert stat.S_IMODE(os.stat(tmp_path / METRICS_FILE).st_mode) == 0o600  # made private again
    assert [(r["round"], r["dice"]) for r in read_metrics(tmp_path)] == [(0, 0.5), (1, 0.7)]
    assert read_metrics(tmp_path / "missing") == []


def test_report_gives_epsilon_for_every_site_and_round(tmp_path):
    """b waited round 0 out (it reports round 1 only, and trained from round 1); c ran without DP."""
    from fedfms_secure.privacy.budget import append_ledger
    from fedfms_secure.privacy.site import STATE_FILE

    store = StateStore(tmp_path / "server")
    for site in ("a", "b", "c"):
        (tmp_path / site).mkdir()
    for r, site in ((0, "a"), (0, "c"), (1, "a"), (1, "b"), (1, "c")):
        store.append_record("metrics.jsonl", _known(site, r))
        append_metrics(tmp_path / site, _scores(site, 0.5, r))
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
