"""Does CKKS cost Dice? Encrypted against plaintext FedAvg, on the same seed and on the same inputs.

Two comparisons, both from real federations (``run_demo``: server and site processes, mTLS):

1. *Whole runs.* For each seed, a demo without DP under CKKS (packed, quantised) and one in
   plaintext (float64, summed exactly). Both are reproducible (a rerun repeats its Dice exactly),
   so their difference is the effect of CKKS's quantisation on the whole training trajectory.
2. *One aggregation, same inputs.* The CKKS run keeps every site's per-round delta and weight and
   the decrypted aggregate (``--save-updates``). For each round, the script rebuilds the global
   model the sites started from, applies (a) the decrypted CKKS aggregate and (b) the exact
   plaintext weighted FedAvg of the *same* deltas, and scores both on every site's validation
   slices. This isolates what CKKS changes in one step from how training amplifies any
   difference over later rounds.
3. *Training's own sensitivity, no encryption.* On the same sites and splits, FedAvg in-process
   (the sites' ``train_local``, the plan's epochs, batch size and learning rate): once exactly,
   and once for each size in ``--perturb`` with uniform noise of that size added to every
   aggregate (1e-12: far below any encoding's error; 2e-5: the size of CKKS's quantisation
   error). If a 1e-12 nudge moves the final Dice as much as CKKS does, the whole-run difference
   measures the training's chaos, not the encryption.

Writes ``benchmarks/results/ckks_vs_plain.{md,json}`` (``ckks_vs_plain_lr<LR>.*`` with ``--lr``).

    python -m benchmarks.ckks_vs_plain                  # seeds 0 1 2, 3 sites, 5 rounds (~13 min on 2 cores)
    python -m benchmarks.ckks_vs_plain --lr 1e-3        # the same at a smaller learning rate
    python -m benchmarks.ckks_vs_plain --seeds 0 --rounds 2 --out /tmp/x   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from benchmarks import _common
from fedfms_secure.config import FEDERATED_LEARNING_RATE, ServerConfig
from fedfms_secure.data import load_site
from fedfms_secure.demo import DemoOptions, run_demo
from fedfms_secure.he.packing import DEFAULT_UPDATE_BOUND
from fedfms_secure.model.modes import apply_mode
from fedfms_secure.model.registry import build_model
from fedfms_secure.model.vector import flatten, load_vector
from fedfms_secure.train.local import TrainConfig, train_local
from fedfms_secure.train.metrics import evaluate_segmentation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"the sites' Adam learning rate (default: the plan's, {FEDERATED_LEARNING_RATE:g})")
    parser.add_argument("--perturb", type=float, nargs="*", default=[1e-12, 2e-5],
                        help="sizes of the uniform noise added to each aggregate in section 3 (none: skip it)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    head = _common.header(seeds=args.seeds, argv=_common.script_argv(__file__, argv), clients=args.clients,
                          rounds=args.rounds, local_epochs=args.local_epochs, preset="tiny (64 px), synthetic NIfTI sites",
                          training=f"FedMSA, no DP, Adam lr {args.lr or FEDERATED_LEARNING_RATE:g}"
                          + (" (the demo's plan)" if args.lr is None else ""))
    progress = _common.Progress((3 if args.perturb else 2) * len(args.seeds))
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedfms-ckks-vs-plain-") as tmp:
        for seed in args.seeds:
            finals: dict[str, list[float]] = {}
            one_step: list[dict[str, float]] = []
            sensitivity: list[dict[str, Any]] = []
            for he in (False, True):
                name = "ckks" if he else "plain"
                progress.start(f"seed {seed}: {name}")
                out = Path(tmp) / f"{name}-{seed}"
                options = DemoOptions(out=out, clients=args.clients, rounds=args.rounds, epsilon=math.inf, he=he,
                                      seed=seed, local_epochs=args.local_epochs, save_updates=he,
                                      learning_rate=args.lr)
                report = run_demo(options, Console(file=open(out.parent / f"{name}-{seed}.console", "w")))
                finals[name] = [r["dice_mean"] for r in report["rounds"]]
                if he:
                    one_step = same_input_rounds(out, options)
                progress.finish()
                if not he and args.perturb:
                    progress.start(f"seed {seed}: in-process FedAvg, exact and perturbed")
                    sensitivity = perturbed_rounds(out, options, args.perturb)
                    progress.finish()
            runs.append({
                "seed": seed,
                "dice_plain": finals["plain"],
                "dice_ckks": finals["ckks"],
                "final_delta": finals["ckks"][-1] - finals["plain"][-1],
                "max_round_delta": max(abs(a - b) for a, b in zip(finals["ckks"], finals["plain"])),
                "one_step": one_step,
                "sensitivity": sensitivity,
            })
    summary = _summary(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ckks_vs_plain" if args.lr is None else f"ckks_vs_plain_lr{args.lr:g}"
    (args.out / f"{stem}.json").write_text(json.dumps({"header": head, "summary": summary, "runs": runs},
                                                            indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(head, summary, runs))
    print(_markdown(head, summary, runs))
    return 0


def _demo_setup(out: Path, options: DemoOptions) -> tuple[list[str], Any, list[str], np.ndarray, dict[str, Any]]:
    """The demo run's sites, its model (theta_0 loaded) and trained names, theta_0, and each site's data."""
    run = out / "run"
    sites = sorted(p.name for p in (out / "data").iterdir() if p.is_dir())
    model = build_model(options.preset, seed=options.seed, pretrained=None if options.pretrained else False)
    names = apply_mode(model, options.mode)
    theta_0 = flatten(model, names).astype(np.float64)
    data = {s: load_site(out / "data" / s, image_size=model.preset.img_size, split_file=run / s / "split.json",
                         seed=options.seed, cache_dir=run / s / "cache") for s in sites}
    return sites, model, names, theta_0, data


def same_input_rounds(out: Path, options: DemoOptions) -> list[dict[str, float]]:
    """Per round: the decrypted CKKS aggregate against the plaintext FedAvg of the same deltas.

    Returns ``max_abs_error`` (aggregate), ``dice_ckks`` / ``dice_plain`` (mean over sites of the
    validation Dice of the global model built from each) and their difference.
    """
    run = out / "run"
    sites, model, names, theta, data = _demo_setup(out, options)
    val = {s: data[s].val for s in sites}
    rows = []
    for round_ in range(options.rounds):
        saved = [np.load(run / s / "updates" / f"round_{round_}.npz") for s in sites]
        aggregates = [f["aggregate"] for f in saved]
        if any(not np.array_equal(aggregates[0], a) for a in aggregates[1:]):
            raise RuntimeError(f"round {round_}: the sites decrypted different aggregates")
        # the sites clipped their weighted update to the plan's bound (DEFAULT_UPDATE_BOUND in files
        # written before the bound was recorded)
        bound = float(saved[0]["bound"]) if "bound" in saved[0] else DEFAULT_UPDATE_BOUND
        plain = np.sum([np.clip(float(f["weight"]) * f["delta"], -bound, bound) for f in saved], axis=0)
        dice = {}
        for label, aggregate in (("ckks", aggregates[0]), ("plain", plain)):
            load_vector(model, names, theta + aggregate)
            scores = [evaluate_segmentation(model, val[s])["dice_mean"] for s in sites]
            dice[label] = statistics.fmean(scores)
        rows.append({
            "round": round_ + 1,
            "max_abs_error": float(np.max(np.abs(aggregates[0] - plain))),
            "max_abs_update": float(np.max(np.abs(plain))),
            "quant_step": float(saved[0]["step"]) if "step" in saved[0] else 0.0,
            "dice_ckks": dice["ckks"],
            "dice_plain": dice["plain"],
            "delta": dice["ckks"] - dice["plain"],
        })
        theta = theta + aggregates[0]  # the sites went on from the CKKS aggregate
    return rows


def perturbed_rounds(out: Path, options: DemoOptions, sizes: list[float]) -> list[dict[str, Any]]:
    """In-process FedAvg on the demo's sites and splits: exact, then with each aggregate perturbed.

    Each site trains with ``train_local`` and the sites' own ``TrainConfig`` (the plan's local
    epochs, batch size and learning rate, and its seed); the aggregate is the exact sample-weighted
    mean of the deltas. A perturbed run adds uniform noise in +-size (seeded) to every aggregate.
    Returns one row per run: ``size`` (0 for the exact run), Dice per round (mean over sites of the
    global model's validation Dice), and the largest |theta - theta_exact| at the end.
    """
    sites, model, names, theta_0, data = _demo_setup(out, options)
    plan = ServerConfig(keys=out, state=out)  # the plan's defaults: batch size and learning rate
    configs = {s: TrainConfig(epochs=options.local_epochs, batch_size=min(plan.batch_size, len(data[s].train)),
                              lr=options.learning_rate or plan.learning_rate, seed=options.seed)
               for s in sites}

    def fedavg(size: float) -> tuple[np.ndarray, list[float]]:
        rng = np.random.default_rng(options.seed)
        theta, dice = theta_0.copy(), []
        for _ in range(options.rounds):
            total, weights = np.zeros_like(theta), 0
            for s in sites:
                load_vector(model, names, theta)
                result = train_local(model, data[s].train, configs[s])
                total += result.num_samples * (flatten(model, names).astype(np.float64) - theta)
                weights += result.num_samples
            aggregate = total / weights
            if size:
                aggregate += rng.uniform(-size, size, aggregate.size)
            theta = theta + aggregate
            load_vector(model, names, theta)
            dice.append(statistics.fmean(evaluate_segmentation(model, data[s].val)["dice_mean"] for s in sites))
        return theta, dice

    exact, exact_dice = fedavg(0.0)
    rows: list[dict[str, Any]] = [{"size": 0.0, "dice": exact_dice, "final_delta": 0.0, "max_round_delta": 0.0,
                                   "max_abs_theta_delta": 0.0}]
    for size in sizes:
        theta, dice = fedavg(size)
        rows.append({"size": size, "dice": dice, "final_delta": dice[-1] - exact_dice[-1],
                     "max_round_delta": max(abs(a - b) for a, b in zip(dice, exact_dice)),
                     "max_abs_theta_delta": float(np.max(np.abs(theta - exact)))})
    return rows


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    finals = [r["final_delta"] for r in runs]
    steps = [abs(s["delta"]) for r in runs for s in r["one_step"]]
    return {
        "final_delta_mean": statistics.fmean(finals),
        "final_delta_abs_max": max(abs(d) for d in finals),
        "final_delta_sem": statistics.stdev(finals) / math.sqrt(len(finals)) if len(finals) > 1 else float("nan"),
        "one_step_delta_abs_max": max(steps),
        "one_step_delta_abs_mean": statistics.fmean(steps),
        "aggregate_error_max": max(s["max_abs_error"] for r in runs for s in r["one_step"]),
        "perturbed_final_delta_abs_max": {
            str(size): max(abs(p["final_delta"]) for r in runs for p in r["sensitivity"] if p["size"] == size)
            for size in sorted({p["size"] for r in runs for p in r["sensitivity"] if p["size"]})
        },
    }


def _markdown(head: dict[str, Any], summary: dict[str, float], runs: list[dict[str, Any]]) -> str:
    lines = ["# CKKS against plaintext FedAvg: Dice on the same seed and on the same inputs", "",
             *_common.header_markdown(head), "",
             "## Whole runs (same seed; each run is reproducible)", "",
             "| seed | plaintext Dice per round | CKKS Dice per round | final CKKS - plaintext | largest round difference |",
             "| --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['seed']} | {', '.join(f'{d:.4f}' for d in r['dice_plain'])} | "
                     f"{', '.join(f'{d:.4f}' for d in r['dice_ckks'])} | {r['final_delta']:+.4f} | "
                     f"{r['max_round_delta']:.4f} |")
    lines += ["", f"Mean final difference {summary['final_delta_mean']:+.4f} "
                  f"(standard error {summary['final_delta_sem']:.4f}); largest |difference| "
                  f"{summary['final_delta_abs_max']:.4f}.", "",
              "## One aggregation, same inputs (CKKS aggregate against the plaintext FedAvg of the same deltas)", "",
              "| seed | round | max abs aggregate error | max abs update | Dice CKKS | Dice plaintext | difference |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        for s in r["one_step"]:
            lines.append(f"| {r['seed']} | {s['round']} | {s['max_abs_error']:.2e} | {s['max_abs_update']:.3f} | "
                         f"{s['dice_ckks']:.4f} | {s['dice_plain']:.4f} | {s['delta']:+.5f} |")
    lines += ["", f"Largest one-step |difference| {summary['one_step_delta_abs_max']:.5f} "
                  f"(mean {summary['one_step_delta_abs_mean']:.5f}); largest aggregate error "
                  f"{summary['aggregate_error_max']:.2e}.", ""]
    if any(r["sensitivity"] for r in runs):
        lines += ["## Training's own sensitivity (in-process FedAvg, no encryption, same sites and seed)", "",
                  "Every aggregate of the exact run, perturbed by uniform noise of the given size.", "",
                  "| seed | perturbation | Dice per round | final - exact | largest round difference | "
                  "max abs weight difference at the end |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in runs:
            for p in r["sensitivity"]:
                size = "none (exact)" if not p["size"] else f"+-{p['size']:.0e}"
                lines.append(f"| {r['seed']} | {size} | {', '.join(f'{d:.4f}' for d in p['dice'])} | "
                             f"{p['final_delta']:+.4f} | {p['max_round_delta']:.4f} | "
                             f"{p['max_abs_theta_delta']:.2e} |")
        floor = summary["perturbed_final_delta_abs_max"]
        lines += ["", "Largest |final difference| from the exact run: "
                  + ", ".join(f"{float(k):.0e} -> {v:.4f}" for k, v in floor.items())
                  + f"; CKKS against plaintext (section 1): {summary['final_delta_abs_max']:.4f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
