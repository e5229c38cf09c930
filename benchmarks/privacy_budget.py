"""What privacy costs in Dice, bytes and time: epsilon x mode x CKKS, with centralized and local-only baselines.

    .venv/bin/python -m benchmarks.privacy_budget              # the default grid (about 30 min on 2 quiet CPU cores)
    .venv/bin/python -m benchmarks.privacy_budget --quick      # a smaller grid (under 5 min)
    .venv/bin/python -m benchmarks.privacy_budget --data DIR --holdout site_3 --seeds 0 1 2

The grid: epsilon in {inf, 16, 8, 4, 2, 1} (inf: no DP) x {fedmsa, fedsam}, packed CKKS, at
**patient level** (one DP record = one patient, the default everywhere), and beside it the same
federations at **slice level** (``--privacy-unit slice``: epsilon per slice, which does not protect
a patient whose volume gives several slices) at the epsilons of ``--slice-epsilons`` (default 8).
``--he on off`` adds the ``--no-he`` plaintext sums. Every federated run is ``fedfms-secure demo``
(``run_demo``): a real server process and one process per site on loopback under mutual TLS,
DP-SGD at each site (Opacus, epsilon per site for the whole run). Baselines, with the same budget
of epochs (rounds x local epochs) and the same batch (expected patients per step): *central* (all
sites' training patients pooled, one model) and *local* (each site alone), at patient level, at the
epsilons of ``--baseline-epsilons`` (default inf and 8).

Data: the demo's synthetic sites (``fedfms-secure demo``'s generator: 200-240 volumes of 64 x 64 x 8
per site, one set per seed) by default, since patient-level DP needs many patients per site, or the
MSD-layout site folders under ``--data``. ``--holdout SITE`` leaves that site out of training and
scores every model on it too (leave-one-site-out).

Outputs in ``--out`` (default ``benchmarks/results``), stem ``--name`` (default privacy_budget):

* ``NAME.csv``: one row per run (kind, mode, epsilon, he, seed, Dice mean/std, HD95, bytes up and
  down per site per round, seconds per round, trainable and communicated parameters, rounds,
  epsilon spent, ...). The grid is resumable: a run whose row is already in the CSV for the same
  configuration (``config`` column) is skipped, so an interrupted grid continues where it stopped;
  ``--fresh`` starts the CSV over.
* ``NAME.md``: the header (machine, commit, seeds, command, date) and the tables;
* ``NAME_dice.png`` (Dice against epsilon per mode, CKKS on and off, baselines as horizontal
  lines), ``NAME_bytes.png`` (bytes per site per round) and ``NAME_seconds.png`` (seconds per round).

Numbers here come from the tiny preset (64 px) on synthetic data unless ``--data``/``--preset``
say otherwise; the FedFMS paper's setting is vit_b at 1024 px on real data. DP noise is drawn from
the operating system's entropy (as at a real site), so DP runs differ between repetitions even
with the same seed; runs without DP are deterministic per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import _common

GRID_EPSILONS = (math.inf, 16.0, 8.0, 4.0, 2.0, 1.0)
MODES = ("fedmsa", "fedsam")
KINDS = ("federated", "central", "local")
COLUMNS = (
    "kind", "mode", "unit", "epsilon", "he", "seed", "dice_mean", "dice_std", "hd95", "iou_mean",
    "bytes_up_per_round", "bytes_down_per_round", "seconds_per_round", "trainable_params",
    "communicated_params", "rounds", "local_epochs", "epsilon_spent", "holdout", "holdout_dice_mean",
    "holdout_hd95", "wall_seconds", "config", "commit",
)  # fmt: skip

# the grids: rounds, local epochs, sites, synthetic data (None: the demo's, see fedfms_secure.demo.DEMO_DATA),
# epsilons (patient level), slice-level epsilons, modes, CKKS on/off, baseline epsilons. default: 14 federated
# runs + 8 baselines; the runs without DP train on every slice and take the longest (a 5 x 5 fedmsa demo without
# DP about 10 min on 2 CPU cores, with DP about 2); quick: 4 + 2 runs; toy (tests): 2 + 1 runs
PROFILES: dict[str, dict[str, Any]] = {
    "default": {"rounds": 5, "local_epochs": 5, "clients": 3, "synth": None, "epsilons": GRID_EPSILONS,
                "slice_epsilons": (8.0,), "modes": MODES, "he": (True,), "baseline_epsilons": (math.inf, 8.0)},
    "quick": {"rounds": 3, "local_epochs": 2, "clients": 3, "synth": None, "epsilons": (math.inf, 8.0),
              "slice_epsilons": (), "modes": MODES, "he": (True,), "baseline_epsilons": (8.0,)},
    "toy": {"rounds": 1, "local_epochs": 1, "clients": 2, "synth": ((32, 32, 6), (12, 14), 4), "epsilons": (8.0,),
            "slice_epsilons": (8.0,), "modes": ("fedmsa",), "he": (True,), "baseline_epsilons": (8.0,)},
}  # fmt: skip
UNITS = ("patient", "slice")


@dataclass(frozen=True)
class Run:
    """One row of the grid."""

    kind: str
    mode: str
    epsilon: float
    he: bool
    seed: int
    unit: str = "patient"  # what one DP record is; "slice" does not protect patients

    @property
    def label(self) -> str:
        he = (" CKKS" if self.he else " plain") if self.kind == "federated" else ""
        unit = " (slice-level DP)" if self.unit == "slice" and not math.isinf(self.epsilon) else ""
        return f"{self.kind} {self.mode}{he} epsilon={_fmt_eps(self.epsilon)}{unit} seed={self.seed}"

    def key(self, config: str) -> tuple[str, ...]:
        return (config, self.kind, self.mode, self.unit, _fmt_eps(self.epsilon), str(self.he).lower(), str(self.seed))


@dataclass(frozen=True)
class Plan:
    """What every run shares (its hash is the ``config`` column)."""

    preset: str
    rounds: int
    local_epochs: int
    clients: int
    synth_shape: tuple[int, int, int]  # each generated volume (H, W, slices)
    synth_volumes: tuple[int, int]  # (fewest, most) volumes (patients) a generated site
    batch_size: int  # the plan's batch: expected patients (or slices) per DP-SGD step
    data: str | None
    holdout: str | None
    pretrained: bool

    @property
    def config_id(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def build_runs(plan_epsilons: Sequence[float], modes: Sequence[str], he: Sequence[bool], seeds: Sequence[int],
               baseline_epsilons: Sequence[float], baselines: bool,
               slice_epsilons: Sequence[float] = ()) -> list[Run]:  # fmt: skip
    """The grid, seed by seed: federated runs at patient level, then the baselines, then the slice-level
    federations (the costliest: with DP they train on every slice, not one slice per sampled patient)."""
    runs = []
    for seed in seeds:
        for mode in modes:
            for eps in plan_epsilons:
                for h in he:
                    runs.append(Run("federated", mode, eps, h, seed))
        if baselines:
            for mode in modes:
                for kind in ("central", "local"):
                    for eps in baseline_epsilons:
                        runs.append(Run(kind, mode, eps, False, seed))
        for mode in modes:
            for eps in slice_epsilons:
                if not math.isinf(eps):  # without DP the unit changes nothing
                    runs.append(Run("federated", mode, eps, True, seed, unit="slice"))
    return runs


# --- one run ---------------------------------------------------------------------------------------------
def _model_counts(preset: str, mode: str) -> tuple[int, int]:
    from fedfms_secure.model import build_model
    from fedfms_secure.model.modes import mode_summary

    summary = mode_summary(build_model(preset, seed=0, pretrained=None if preset == "tiny" else False), mode)
    return summary["trainable"], summary["communicated"]


def run_federated(run: Run, plan: Plan, data_dir: Path, work: Path) -> dict[str, Any]:
    """One ``run_demo`` federation; returns its CSV row (without config and commit)."""
    from rich.console import Console

    from fedfms_secure.demo import DemoOptions, run_demo

    options = DemoOptions(out=work, clients=plan.clients, rounds=plan.rounds, epsilon=run.epsilon, he=run.he,
                          mode=run.mode, data=data_dir, preset=plan.preset, seed=run.seed, batch_size=plan.batch_size,
                          privacy_unit=run.unit, local_epochs=plan.local_epochs, pretrained=plan.pretrained,
                          holdout=plan.holdout)  # fmt: skip
    started = time.monotonic()
    report = run_demo(options, console=Console(file=io.StringIO()))
    wall = time.monotonic() - started
    rounds = report["rounds"]
    reporting = sum(r["sites_reporting"] for r in rounds) or 1
    final = (report.get("final") or {}).get("mean") or {}
    holdout = report.get("holdout") or {}
    return {
        **_scores(final, fallback_dice=rounds[-1]["dice_mean"]),
        "bytes_up_per_round": sum(r["bytes_up_total"] for r in rounds) / reporting,
        "bytes_down_per_round": sum(r["bytes_down_total"] for r in rounds) / reporting,
        # round 1's clock starts with the server, so it also holds the sites' start-up: left out when there are more
        "seconds_per_round": statistics.fmean(r["seconds"] for r in (rounds[1:] if len(rounds) > 1 else rounds)),
        "epsilon_spent": report.get("epsilon_final_max"),
        "holdout_dice_mean": _first(holdout, "dice_mean"),
        "holdout_hd95": _first(holdout, "hd95_mean"),
        "wall_seconds": wall,
    }


def _scores(mean: dict[str, Any], fallback_dice: float | None = None) -> dict[str, Any]:
    """Dice mean and std, IoU and HD95 from a mean over sites (each site: mean and std over its images)."""
    dice = _first(mean, "dice_mean")
    return {
        "dice_mean": dice if dice is not None else (fallback_dice if fallback_dice is not None else math.nan),
        "dice_std": _first(mean, "dice_std"),
        "hd95": _first(mean, "hd95_mean"),
        "iou_mean": _first(mean, "iou_mean"),
    }


def run_baseline(run: Run, plan: Plan, data_dir: Path) -> dict[str, Any]:
    """A centralized or local-only baseline with the federated runs' epochs budget (one torch thread, as
    each site process of a federated run has)."""
    import torch

    from fedfms_secure.train.baselines import BaselineOptions, run_local_baselines, train_central

    torch.set_num_threads(1)

    options = BaselineOptions(mode=run.mode, preset=plan.preset, epochs=plan.rounds * plan.local_epochs,
                              batch_size=plan.batch_size, privacy_unit=run.unit,
                              epsilon=None if math.isinf(run.epsilon) else run.epsilon, seed=run.seed,
                              pretrained=plan.pretrained, holdout=plan.holdout)  # fmt: skip
    train = train_central if run.kind == "central" else run_local_baselines
    started = time.monotonic()
    result = train(data_dir, options)
    wall = time.monotonic() - started
    # the mean over sites of each site's scores, as the federated report gives it (not ``result["mean"]``,
    # which pools the images of every site)
    sites = result.get("sites") or []
    per_site_mean = {key: _mean([site[key] for site in sites if site.get(key) is not None])
                     for key in ("dice_mean", "dice_std", "iou_mean", "hd95_mean")}  # fmt: skip
    holdout = result.get("holdout") or {}
    return {
        **_scores(per_site_mean),
        "bytes_up_per_round": 0.0,
        "bytes_down_per_round": 0.0,
        "seconds_per_round": float(result.get("seconds", wall)) / plan.rounds,
        "epsilon_spent": result.get("epsilon"),
        "holdout_dice_mean": _first(holdout, "dice_mean"),
        "holdout_hd95": _first(holdout, "hd95_mean"),
        "wall_seconds": wall,
    }


def _first(values: dict[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        if values and values.get(key) is not None and not isinstance(values[key], dict):
            return float(values[key])
    return None


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


# --- reading the CSV back --------------------------------------------------------------------------------
def _num(text: str) -> float:
    if text in ("", None):
        return math.nan
    return float(text)


def load_rows(path: Path, config: str) -> list[dict[str, Any]]:
    """The CSV's rows of configuration ``config``, numbers parsed."""
    rows = []
    for row in _common.read_csv(path):
        if row.get("config") != config:
            continue
        parsed: dict[str, Any] = dict(row)
        for key in COLUMNS:
            if key in ("kind", "mode", "unit", "holdout", "config", "commit"):
                continue
            if key == "he":
                parsed[key] = row[key] == "true"
            else:
                parsed[key] = _num(row[key])
        rows.append(parsed)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and std over seeds) per (kind, mode, unit, epsilon, he), in grid order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["mode"], row.get("unit") or "patient", row["epsilon"], row["he"]),
                          []).append(row)

    def order(key: tuple) -> tuple:
        kind, mode, unit, eps, he = key
        return (KINDS.index(kind), MODES.index(mode) if mode in MODES else 9, UNITS.index(unit), not he, -eps)

    out = []
    for key in sorted(groups, key=order):
        members = groups[key]
        item = {"kind": key[0], "mode": key[1], "unit": key[2], "epsilon": key[3], "he": key[4],
                "seeds": len(members)}
        for col in ("dice_mean", "dice_std", "hd95", "iou_mean", "bytes_up_per_round", "bytes_down_per_round",
                    "seconds_per_round", "trainable_params", "communicated_params", "epsilon_spent",
                    "holdout_dice_mean", "holdout_hd95", "wall_seconds"):  # fmt: skip
            item[col] = _mean([m[col] for m in members])
        dice = [m["dice_mean"] for m in members if not math.isnan(m["dice_mean"])]
        item["dice_seed_std"] = statistics.pstdev(dice) if len(dice) > 1 else math.nan
        out.append(item)
    return out


# --- outputs ---------------------------------------------------------------------------------------------
def _fmt_eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _f(value: float, spec: str = ".3f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _si(n: float) -> str:
    if n is None or math.isnan(n):
        return "-"
    if n == 0:
        return "0"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def markdown(head: dict[str, Any], summary: list[dict[str, Any]], plan: Plan, name: str) -> str:
    holdout = plan.holdout is not None
    lines = [
        "# What privacy costs: Dice, bytes and seconds against epsilon",
        "",
        *_common.header_markdown(head),
        "",
        f"Every federated row is `fedfms-secure demo`: {plan.clients} site processes and a server on loopback "
        f"under mutual TLS, {plan.rounds} rounds x {plan.local_epochs} local epochs, preset `{plan.preset}`; "
        "epsilon is each site's target for the whole run (inf: no DP; delta as the site resolves it), "
        f"expected {plan.batch_size} records per DP-SGD step, CKKS = packed CKKS aggregation, plain = `--no-he`. "
        "**DP unit**: *patient* = one record is a patient (the default: each step Poisson-samples patients and "
        "takes one slice of each, so epsilon protects a patient's whole volume); *slice* = `--privacy-unit slice`, "
        "epsilon per slice, which **does not protect patients** (a volume gives several slices). Baselines train "
        f"for the same {plan.rounds * plan.local_epochs} epochs at patient level: central = all sites' training "
        "patients pooled, local = each site alone (scores averaged over sites). Dice/IoU/HD95: final model on each site's validation slices "
        "(HD95 in pixels), averaged over sites; dice std: within-site spread as the report gives it. Bytes are "
        "per site per round (serialized messages, as the site counts them); seconds per round are the "
        "server's round durations from round 2 on (round 1's clock also holds the sites' start-up; baselines: "
        "training and scoring seconds / rounds).",
        "",
        *([f"**Setting:** preset `{plan.preset}` ({'64 px' if plan.preset == 'tiny' else 'its input size'}) on "
           + ("synthetic sites" if plan.data is None else "the sites under `--data`")
           + "; the FedFMS paper's setting is vit_b at 1024 px on real data. Compare trends, not absolute Dice.", ""]
          if plan.preset != "vit_b" or plan.data is None else []),
        f"![Dice against epsilon]({name}_dice.png)",
        "",
        "| kind | mode | aggregation | DP unit | epsilon | epsilon spent | Dice | Dice std | IoU | HD95 "
        + ("| holdout Dice | holdout HD95 " if holdout else "")
        + "| up / site / round | down / site / round | s / round | trainable | communicated | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        + ("| --- | --- " if holdout else "")
        + "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        agg = ("CKKS" if s["he"] else "plain") if s["kind"] == "federated" else "-"
        dice = _f(s["dice_mean"])
        if not math.isnan(s["dice_seed_std"]):
            dice += f" ± {s['dice_seed_std']:.3f}"
        unit = "-" if math.isinf(s["epsilon"]) else ("**slice** (not patients)" if s["unit"] == "slice" else "patient")
        cells = [s["kind"], s["mode"], agg, unit, _fmt_eps(s["epsilon"]), _f(s["epsilon_spent"], ".2f"), dice,
                 _f(s["dice_std"]), _f(s["iou_mean"]), _f(s["hd95"], ".1f")]  # fmt: skip
        if holdout:
            cells += [_f(s["holdout_dice_mean"]), _f(s["holdout_hd95"], ".1f")]
        cells += [_si(s["bytes_up_per_round"]), _si(s["bytes_down_per_round"]), _f(s["seconds_per_round"], ".1f"),
                  f"{s['trainable_params']:,.0f}", f"{s['communicated_params']:,.0f}", str(s["seeds"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "With several seeds, Dice is the mean over seeds ± their std (runs: how many).",
        "",
        f"![Bytes per site per round]({name}_bytes.png)",
        "",
        f"![Seconds per round]({name}_seconds.png)",
        "",
    ]
    return "\n".join(lines)


def _eps_positions(epsilons: Sequence[float]) -> tuple[dict[float, float], list[float], list[str]]:
    """x positions: log2 of each finite epsilon, infinity one step right of the largest."""
    finite = sorted(e for e in set(epsilons) if not math.isinf(e))
    pos = {e: math.log2(e) for e in finite}
    if any(math.isinf(e) for e in epsilons):
        pos[math.inf] = (math.log2(finite[-1]) + 1.0) if finite else 0.0
    ticks = sorted(pos, key=lambda e: pos[e])
    return pos, [pos[e] for e in ticks], [("∞ (no DP)" if math.isinf(e) else f"{e:g}") for e in ticks]


def plots(head: dict[str, Any], summary: list[dict[str, Any]], plan: Plan, out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caption = _common.header_caption(head)
    fed = [s for s in summary if s["kind"] == "federated"]
    modes = [m for m in MODES if any(s["mode"] == m for s in summary)]
    paths = []
    metric = "holdout_dice_mean" if plan.holdout else "dice_mean"
    pos, ticks, labels = _eps_positions([s["epsilon"] for s in summary])

    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for he, style in ((True, "o-"), (False, "s--")):
            pts = sorted((pos[s["epsilon"]], s[metric]) for s in fed
                         if s["mode"] == mode and s["he"] == he and s["unit"] == "patient")
            if pts:
                ax.plot(*zip(*pts), style, label=f"federated, {'CKKS' if he else 'plain'}, patient-level DP")
        pts = sorted((pos[s["epsilon"]], s[metric]) for s in fed if s["mode"] == mode and s["unit"] == "slice")
        if pts:
            ax.plot(*zip(*pts), "x", color="0.35", markersize=8,
                    label="federated, slice-level DP (does not protect patients)")
        for kind, color in (("central", "tab:green"), ("local", "tab:red")):
            rows = [s for s in summary if s["kind"] == kind and s["mode"] == mode]
            for s in rows:
                if math.isinf(s["epsilon"]):
                    ax.axhline(s[metric], color=color, linestyle=":", label=f"{kind}, no DP")
            dp = sorted((pos[s["epsilon"]], s[metric]) for s in rows if not math.isinf(s["epsilon"]))
            if dp:
                ax.plot(*zip(*dp), "^", color=color, label=f"{kind}, DP")
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("epsilon per site (whole run)")
        ax.set_ylabel(("holdout " if plan.holdout else "") + "Dice (mean over sites)")
        ax.set_title(mode)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, f"Dice against epsilon ({plan.preset}, {plan.rounds} rounds x {plan.local_epochs} epochs)",
            caption, out / f"{name}_dice.png", plt)  # fmt: skip
    paths.append(out / f"{name}_dice.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = []
    for mode in modes:
        for he in (False, True):
            rows = [s for s in fed if s["mode"] == mode and s["he"] == he and s["unit"] == "patient"]
            if rows:
                bars.append((f"{mode}\n{'CKKS' if he else 'plain'}", _mean([r["bytes_up_per_round"] for r in rows]),
                             _mean([r["bytes_down_per_round"] for r in rows])))  # fmt: skip
    if bars:
        x = range(len(bars))
        up = ax.bar([i - 0.2 for i in x], [b[1] / 1e6 for b in bars], 0.4, label="up (upload + commit)")
        down = ax.bar([i + 0.2 for i in x], [b[2] / 1e6 for b in bars], 0.4, label="down (global state + total weight)")
        for container in (up, down):
            ax.bar_label(container, fmt="%.2f", fontsize=7)
        ax.set_xticks(list(x), [b[0] for b in bars])
        ax.legend(fontsize=8)
    ax.set_ylabel("MB per site per round")
    _finish(fig, "Bytes per site per round (mean over the grid's epsilons)", caption, out / f"{name}_bytes.png", plt)
    paths.append(out / f"{name}_bytes.png")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, color in zip(modes, ("tab:blue", "tab:orange")):
        for he, style in ((True, "o-"), (False, "s--")):
            pts = sorted((pos[s["epsilon"]], s["seconds_per_round"]) for s in fed
                         if s["mode"] == mode and s["he"] == he and s["unit"] == "patient")
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{mode}, {'CKKS' if he else 'plain'}")
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("epsilon per site (whole run)")
    ax.set_ylabel("seconds per round (server)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    _finish(fig, f"Seconds per round ({plan.clients} sites, {plan.local_epochs} local epochs)", caption,
            out / f"{name}_seconds.png", plt)  # fmt: skip
    paths.append(out / f"{name}_seconds.png")
    return paths


def _finish(fig: Any, title: str, caption: str, path: Path, plt: Any) -> None:
    import textwrap

    fig.suptitle(title, fontsize=10)
    caption = textwrap.fill(caption, width=int(fig.get_figwidth() * 18))
    lines = caption.count("\n") + 1
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.025 * lines + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------------
def _epsilon(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an epsilon (a positive number or inf)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon {text!r} must be positive (inf: no DP)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller grid: epsilon inf and 8, 3 rounds x 2 epochs")
    parser.add_argument("--toy", action="store_true", help="a tiny grid for tests (about a minute): 2 sites, 1 round")
    parser.add_argument("--data", type=Path, help="a folder of MSD-layout site folders (default: synthetic sites)")
    parser.add_argument("--holdout", metavar="SITE", help="leave this site out of training and score on it")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--epsilons", type=_epsilon, nargs="+",
                        help="override the grid's epsilons at patient level (inf: no DP)")
    parser.add_argument("--slice-epsilons", type=_epsilon, nargs="*",
                        help="epsilons of the slice-level rows, which do not protect patients (default 8; none: "
                             "no slice-level rows)")
    parser.add_argument("--batch-size", type=int, help="expected records per DP-SGD step (default: the demo's)")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="override the grid's modes")
    parser.add_argument("--he", nargs="+", choices=["on", "off"], help="override the grid's CKKS settings")
    parser.add_argument("--baseline-epsilons", type=_epsilon, nargs="+", help="epsilons of the baselines")
    parser.add_argument("--no-baselines", action="store_true", help="federated runs only")
    parser.add_argument("--rounds", type=int, help="override the profile's rounds")
    parser.add_argument("--local-epochs", type=int, help="override the profile's local epochs")
    parser.add_argument("--clients", type=int, help="override the profile's number of sites")
    parser.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--no-pretrained", action="store_true", help="start from the seeded random initialisation")
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--name", default=None,
                        help="stem of the output files (default privacy_budget, privacy_budget_quick with --quick)")
    parser.add_argument("--work", type=Path, help="keep the runs' folders here (default: a temporary folder)")
    parser.add_argument("--fresh", action="store_true", help="start the CSV over instead of resuming it")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    if args.quick and args.toy:
        parser.error("choose --quick or --toy, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fedfms_secure.errors import FedFmsError

    from fedfms_secure.demo import DEMO_DATA

    profile = PROFILES["toy" if args.toy else "quick" if args.quick else "default"]
    shape, volumes, batch = profile["synth"] or DEMO_DATA["tiny" if args.preset == "tiny" else "sam"]
    try:
        clients = args.clients or (len(_training_sites(args.data, args.holdout)) if args.data else profile["clients"])
    except FedFmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = Plan(
        preset=args.preset,
        rounds=args.rounds or profile["rounds"],
        local_epochs=args.local_epochs or profile["local_epochs"],
        clients=clients,
        synth_shape=tuple(shape),
        synth_volumes=tuple(volumes),
        batch_size=args.batch_size or batch,
        data=str(args.data.resolve()) if args.data else None,
        holdout=args.holdout,
        pretrained=not args.no_pretrained,
    )
    if min(plan.rounds, plan.local_epochs, plan.clients, plan.batch_size) < 1:
        print("error: --rounds, --local-epochs, --clients and --batch-size must be at least 1", file=sys.stderr)
        return 2
    he = tuple(h == "on" for h in args.he) if args.he else profile["he"]
    runs = build_runs(args.epsilons or profile["epsilons"], args.modes or profile["modes"], he, args.seeds,
                      args.baseline_epsilons or profile["baseline_epsilons"], not args.no_baselines,
                      profile["slice_epsilons"] if args.slice_epsilons is None else args.slice_epsilons)  # fmt: skip
    name = args.name or ("privacy_budget_toy" if args.toy else "privacy_budget_quick" if args.quick else "privacy_budget")
    csv_path = args.out / f"{name}.csv"
    if args.dry_run:
        for i, run in enumerate(runs, 1):
            print(f"{i:3d}. {run.label}")
        print(f"{len(runs)} runs; config {plan.config_id}; CSV {csv_path}")
        return 0
    argv_full = _common.script_argv(__file__, argv)
    try:
        return _run_grid(args, plan, runs, name, csv_path, argv_full)
    except FedFmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _training_sites(data: Path, holdout: str | None) -> list[Path]:
    """The site folders under ``data`` that train (all but ``holdout``, which must be one of them)."""
    from fedfms_secure.data import find_sites
    from fedfms_secure.errors import ConfigError

    sites = find_sites(data)
    if holdout is not None and holdout not in {p.name for p in sites}:
        raise ConfigError(f"--holdout {holdout}: {data} has no such site (it has {', '.join(p.name for p in sites)})")
    return [p for p in sites if p.name != holdout]


def _data_for(plan: Plan, data: Path | None, seed: int, work: Path) -> Path:
    """The folder every run of ``seed`` reads: exactly the plan's training sites (and the held-out one).

    Synthetic sites are written once per seed; with ``--data`` and fewer ``--clients`` than sites, a
    folder of links to the first ``clients`` sites (and the held-out one), so baselines and federations
    see the same sites.
    """
    from fedfms_secure.data import find_sites, synth_federation
    from fedfms_secure.errors import ConfigError

    if data is None:
        folder = work / f"data_seed{seed}"
        synth_federation(folder, sites=plan.clients + (plan.holdout is not None), seed=seed, shape=plan.synth_shape,
                         volumes=plan.synth_volumes)
        if plan.holdout is not None and plan.holdout not in {p.name for p in find_sites(folder)}:
            raise ConfigError(f"--holdout {plan.holdout}: the synthetic sites are site_1 .. site_{plan.clients + 1}; "
                              "name one of them")  # fmt: skip
        return folder
    training = _training_sites(data, plan.holdout)
    if len(training) < plan.clients:
        raise ConfigError(f"{data} holds {len(training)} training site(s), fewer than --clients {plan.clients}")
    if len(training) == plan.clients:
        return data
    folder = work / "data_subset"
    if not folder.exists():
        folder.mkdir(parents=True)
        chosen = training[: plan.clients] + ([data / plan.holdout] if plan.holdout else [])
        for site in chosen:
            (folder / site.name).symlink_to(site.resolve(), target_is_directory=True)
    return folder


def _run_grid(args: argparse.Namespace, plan: Plan, runs: list[Run], name: str, csv_path: Path,
              argv: list[str]) -> int:  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fresh and csv_path.exists():
        csv_path.unlink()
    config = plan.config_id
    done = {tuple(r.get(k, "") for k in ("config", "kind", "mode", "unit", "epsilon", "he", "seed"))
            for r in _common.read_csv(csv_path)}  # fmt: skip
    commit = _common.commit()
    progress = _common.Progress(len(runs))
    counts: dict[str, tuple[int, int]] = {}
    work_root = args.work or Path(tempfile.mkdtemp(prefix="fedfms-privacy-budget-"))
    started = time.monotonic()
    try:
        data_dirs: dict[int, Path] = {}
        for run in runs:
            if run.key(config) in done:
                progress.skip(run.label, f"already in {csv_path.name}")
                continue
            if run.seed not in data_dirs:
                data_dirs[run.seed] = _data_for(plan, args.data, run.seed, work_root)
            if run.mode not in counts:
                counts[run.mode] = _model_counts(plan.preset, run.mode)
            progress.start(run.label)
            if run.kind == "federated":
                row = run_federated(run, plan, data_dirs[run.seed], work_root / "run")
            else:
                row = run_baseline(run, plan, data_dirs[run.seed])
            trainable, communicated = counts[run.mode]
            row.update({
                "kind": run.kind, "mode": run.mode, "unit": run.unit, "epsilon": run.epsilon, "he": str(run.he).lower(),
                "seed": run.seed, "trainable_params": trainable,
                "communicated_params": communicated if run.kind == "federated" else 0,
                "rounds": plan.rounds, "local_epochs": plan.local_epochs, "holdout": plan.holdout or "",
                "config": config, "commit": commit,
            })  # fmt: skip
            _common.append_csv(csv_path, COLUMNS, [row])
            progress.finish(f"Dice {_f(row['dice_mean'])}, epsilon spent {_f(row['epsilon_spent'] or math.nan, '.2f')}")
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)
    rows = load_rows(csv_path, config)
    seeds = sorted({int(r["seed"]) for r in rows})
    commits = sorted({r["commit"] for r in rows})
    head = _common.header(seeds=seeds, argv=argv, commit_of_rows=", ".join(commits), config=config,
                          plan=f"preset {plan.preset}, {plan.clients} sites, {plan.rounds} rounds x "
                               f"{plan.local_epochs} local epochs, batch {plan.batch_size}, "
                               + (f"data {plan.data}" if plan.data else
                                  f"synthetic sites (the demo's generator: {plan.synth_volumes[0]}-{plan.synth_volumes[1]} "
                                  f"volumes of {plan.synth_shape} per site)")
                               + (f", holdout {plan.holdout}" if plan.holdout else ""),
                          runtime=f"{time.monotonic() - started:.0f} s this invocation; the {len(rows)} runs in the CSV "
                                  f"took {sum(r['wall_seconds'] for r in rows) / 60:.1f} min in all")  # fmt: skip
    summary = summarize(rows)
    (args.out / f"{name}.md").write_text(markdown(head, summary, plan, name))
    plots(head, summary, plan, args.out, name)
    print(f"wrote {csv_path}, {args.out / (name + '.md')} and 3 PNGs ({len(rows)} runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
