"""The federation report: per-round Dice, epsilon, bytes and seconds, from the files the daemons wrote.

Sources, kept apart by who may know them:

* each site's own state folder: ``metrics.jsonl`` (after each round, Dice, IoU and HD95 of the new
  global model on its validation slices, as means and standard deviations over its images, and
  ``dice_local``), ``initial.json`` (scores of theta_0) and its privacy ledger (epsilon spent). None
  of this ever reaches the server; the demo can read every site's folder only because one person
  runs every party on one machine.
* the server's state folder: ``metrics.jsonl`` (which sites reported each round, whether they
  contributed, the bytes they moved: what the server sees anyway) and ``rounds.jsonl`` (round
  durations).

``final`` holds each site's last record (``dice_mean``, ``dice_std``, ``iou_mean``, ``iou_std``,
``hd95_mean``, ``hd95_std``) and their mean over sites; ``holdout`` the scores of the final model
on a site that never trained (leave-one-site-out), when the run had one.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Mapping

from fedfms_secure.privacy.budget import read_ledger
from fedfms_secure.privacy.site import STATE_FILE as PRIVACY_STATE
from fedfms_secure.server.store import StateStore
from fedfms_secure.site.metrics import read_metrics
from fedfms_secure.train.metrics import METRICS

#: the scores of :func:`fedfms_secure.train.metrics.summarize` that ``final`` holds per site
FINAL_FIELDS = tuple(f"{metric}_{stat}" for metric in METRICS for stat in ("mean", "std"))
# the report's field -> what a site keeps (see site/metrics.py): "dice", "dice_std", "iou", ...
_REPORTED = {field: field.removesuffix("_mean") for field in FINAL_FIELDS}


def build_report(server_state: Path, site_states: Mapping[str, Path], options: Mapping[str, Any],
                 wall_seconds: float, holdout: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Collects the report of one federation run (``holdout``: the held-out site's scores)."""
    store = StateStore(server_state)
    # what the server knows: who reported each round, and the bytes (a line cut short by a crash is left out)
    reports = store.read_records("metrics.jsonl", skip_bad=True)
    durations = {r["round"]: r["seconds"] for r in store.read_records("rounds.jsonl", skip_bad=True)}
    sites = list(site_states)
    # the scores, from each site's own folder (the last record of a round: a restarted site may repeat one)
    scored = {site: {r["round"]: r for r in read_metrics(path)} for site, path in site_states.items()}
    initial = [_initial_dice(path) for path in site_states.values()]
    initial = [d for d in initial if _number(d) is not None]
    rounds = []
    ledgers = {site: {e["round"]: e["epsilon"] for e in read_ledger(path)} if Path(path).is_dir() else {}
               for site, path in site_states.items()}
    private = {site: (Path(path) / PRIVACY_STATE).exists() for site, path in site_states.items()}
    for r in sorted({m["round"] for m in reports} | {r for records in scored.values() for r in records}):
        known = {m["site"]: m for m in reports if m["round"] == r}
        rows = {s: scored[s][r] for s in sites if r in scored[s]}
        # a site without validation slices keeps NaN (null): it is left out of the means, not fatal
        dice = [d for d in (rows[s].get("dice") for s in rows) if _number(d) is not None]
        dice_local = [d for d in (rows[s].get("dice_local") for s in rows) if _number(d) is not None]
        # every site, also in a round it did not report (it may have waited it out, or retired)
        eps = {s: _spent(ledgers[s], r) if private[s] else None for s in sites}
        finite_eps = [e for e in eps.values() if e is not None]
        rounds.append({
            "round": r + 1,
            "dice_mean": statistics.fmean(dice) if dice else float("nan"),
            "dice_std": statistics.pstdev(dice) if len(dice) > 1 else 0.0,
            "dice": {s: rows[s].get("dice") for s in rows},
            "dice_local_mean": statistics.fmean(dice_local) if dice_local else float("nan"),
            "epsilon": eps,
            "epsilon_max": max(finite_eps) if finite_eps else None,
            "bytes_up_total": sum(known[s].get("bytes_up", 0.0) for s in known),
            "bytes_down_total": sum(known[s].get("bytes_down", 0.0) for s in known),
            "seconds": durations.get(r, float("nan")),
            "sites_reporting": len(known),
        })
    return {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "sites": sites,
        "dice_initial": statistics.fmean(initial) if initial else float("nan"),
        "rounds": rounds,
        "dice_final": rounds[-1]["dice_mean"] if rounds else None,
        "final": final_scores(scored, sites),
        "holdout": dict(holdout) if holdout is not None else None,
        "epsilon_final_max": rounds[-1]["epsilon_max"] if rounds else None,
        "seconds_total": wall_seconds,
    }


def plot_report(report: Mapping[str, Any], path: Path) -> None:
    """Dice and epsilon per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r["round"] for r in report["rounds"]]
    dice = [report["dice_initial"]] + [r["dice_mean"] for r in report["rounds"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(rounds, dice, marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("mean validation Dice of the global model")
    ax1.set_xticks(rounds)
    for site in report["sites"]:
        eps = [0.0] + [r["epsilon"].get(site) for r in report["rounds"]]
        if all(e is not None for e in eps):
            ax2.plot(rounds, eps, marker="o", label=site)
    ax2.set_xlabel("round")
    ax2.set_ylabel("epsilon spent (cumulative)")
    ax2.set_xticks(rounds)
    if ax2.lines:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no DP (epsilon = inf)", ha="center", va="center", transform=ax2.transAxes)
    opts = report["options"]
    fig.suptitle(f"{opts.get('mode')} | {'CKKS' if opts.get('he') else 'plaintext'} | target epsilon {opts.get('epsilon')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def final_scores(scored: Mapping[str, Mapping[int, dict[str, Any]]], sites: list[str]) -> dict[str, Any]:
    """Each site's last scores (``scored``: per site, its records by round) and their mean over the
    sites that kept any."""
    last = {site: scored[site][max(scored[site])] for site in sites if scored.get(site)}
    per_site = {site: {"round": last[site]["round"] + 1,
                       **{field: _number(last[site].get(key)) for field, key in _REPORTED.items()}}
                for site in sites if site in last}
    mean = {}
    for field in FINAL_FIELDS:
        values = [row[field] for row in per_site.values() if row[field] is not None]
        mean[field] = statistics.fmean(values) if values else None
    return {"sites": per_site, "mean": mean}


def _number(value: Any) -> float | None:
    """A finite number, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _initial_dice(state: Path) -> float | None:
    path = Path(state) / "initial.json"
    return json.loads(path.read_text())["dice"] if path.exists() else None


def _spent(ledger: dict[int, float], round_: int) -> float:
    """Epsilon a site with DP had spent after ``round_`` (0 before the first round it trained)."""
    spent = [ledger[r] for r in sorted(ledger) if r <= round_]
    return float(spent[-1]) if spent else 0.0


def worse_than_start(report: dict[str, Any]) -> str | None:
    """A warning when the final global model's Dice is below the starting model's, else None."""
    start, final = report.get("dice_initial"), report.get("dice_final")
    if not isinstance(start, float) or not isinstance(final, float) or not final < start:  # NaN: no comparison
        return None
    return (f"the final global model scores WORSE than the starting model (mean Dice {final:.4f} after "
            f"{len(report.get('rounds') or [])} rounds, {start:.4f} before): do not deploy it as is; try more "
            "rounds, a larger --epsilon or a lower --learning-rate")
