"""Dice under DP with the CKKS quantisation sized to the DP noise, against the fixed 17-bit one.

    .venv/bin/python -m benchmarks.quant_dice [--seeds 0 1 2] [--out benchmarks/results]

Runs the DP demo (epsilon 8, CKKS, 3 sites x 5 rounds, tiny preset, synthetic data) per seed in two
settings that differ only in the packing the federation is provisioned with:

  plan     the default: bound lr x steps, step sized so the quantisation error std is at most 1% of
           the DP noise of the weighted updates (``fedfms_secure.he.quantplan``)
  fixed17  bound 1 and 17-bit quantisation (what ``fit_params`` provisioned before the plan sized it)

Each site keeps its per-round delta (``save_updates``), from which the table also checks the plan's
derivation: the per-coordinate std of a delta against ``lr sqrt(T)`` and its largest |value| against
``lr T`` (T = the site's steps that round, from its privacy ledger), and how many weighted values
the bound clipped. Writes ``quant_dice.json`` and ``quant_dice.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from benchmarks import _common
from fedfms_secure.config import FEDERATED_LEARNING_RATE
from fedfms_secure.demo import DemoOptions, run_demo

SETTINGS = {"plan": {}, "fixed17": {"quant_bits": 17, "update_bound": 1.0}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    head = _common.header(seeds=args.seeds, argv=_common.script_argv(__file__, argv),
                          preset="tiny (64 px), synthetic NIfTI sites", clients=3, rounds=5, epsilon=8)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedfms-quant-") as tmp:
        for seed in args.seeds:
            for name in args.settings:
                print(f"running {name} seed {seed} ...", file=sys.stderr, flush=True)
                out = Path(tmp) / f"{name}_{seed}"
                started = time.monotonic()
                report = run_demo(DemoOptions(out=out, seed=seed, epsilon=8.0, save_updates=True, **SETTINGS[name]),
                                  console=Console(file=io.StringIO()))
                runs.append({"setting": name, "seed": seed, **_run(report, out), "wall_s": time.monotonic() - started})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "quant_dice.json").write_text(json.dumps({**head, "runs": runs}, indent=2) + "\n")
    (args.out / "quant_dice.md").write_text(_markdown(head, runs))
    print((args.out / "quant_dice.md").read_text())
    return 0


def _run(report: dict, out: Path) -> dict:
    rounds = report["rounds"]
    manifest = json.loads((out / "run" / "bundles" / "site_1" / "manifest.json").read_text())
    packing = manifest["ckks"]["params"]["packing"]
    std_ratio, max_ratio, clipped, values = [], [], 0, 0
    for site in sorted((out / "run").glob("site_*")):
        ledger = [json.loads(line) for line in (site / "privacy_ledger.jsonl").read_text().splitlines()]
        steps = {e["round"]: e["steps"] for e in ledger}
        for f in sorted((site / "updates").glob("round_*.npz")):
            z = np.load(f)
            delta, weight, t = z["delta"], float(z["weight"]), steps[int(f.stem.split("_")[1])]
            moved = delta[delta != 0]
            std_ratio.append(float(moved.std()) / (FEDERATED_LEARNING_RATE * math.sqrt(t)))
            max_ratio.append(float(np.abs(delta).max()) / (FEDERATED_LEARNING_RATE * t))
            clipped += int(np.count_nonzero(np.abs(delta * weight) > packing["bound"]))
            values += delta.size
    return {
        "dice_per_round": [r["dice_mean"] for r in rounds],
        "dice_final": rounds[-1]["dice_mean"],
        "epsilon_max": rounds[-1]["epsilon_max"],
        "bytes_up_per_site_per_round": rounds[-1]["bytes_up_total"] / rounds[-1]["sites_reporting"],
        "bytes_down_per_site_per_round": rounds[-1]["bytes_down_total"] / rounds[-1]["sites_reporting"],
        "packing": packing, "coeff_mod_bit_sizes": manifest["ckks"]["params"]["coeff_mod_bit_sizes"],
        "delta_std_over_lr_sqrt_t": [min(std_ratio), max(std_ratio)],
        "delta_max_over_lr_t": [min(max_ratio), max(max_ratio)],
        "clipped_values": clipped, "uploaded_values": values,
    }


def _markdown(head: dict, runs: list[dict]) -> str:
    lines = ["# Dice under DP: quantisation sized to the DP noise against fixed 17 bits", "",
             *_common.header_markdown(head), "",
             "| setting | seed | bits, bound, lanes x width, primes | Dice per round | final Dice | epsilon | "
             "B up / site / round | B down / site / round | delta std / (lr sqrt T) | max abs delta / (lr T) | "
             "clipped / values |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        p = r["packing"]
        lines.append(
            f"| {r['setting']} | {r['seed']} | {p['quant_bits']}, {p['bound']:g}, {p['lanes']} x {p['lane_bits']}, "
            f"{r['coeff_mod_bit_sizes']} | {', '.join(f'{d:.4f}' for d in r['dice_per_round'])} | "
            f"{r['dice_final']:.4f} | {r['epsilon_max']:.2f} | {r['bytes_up_per_site_per_round']:,.0f} | "
            f"{r['bytes_down_per_site_per_round']:,.0f} | {r['delta_std_over_lr_sqrt_t'][0]:.2f}-"
            f"{r['delta_std_over_lr_sqrt_t'][1]:.2f} | {r['delta_max_over_lr_t'][0]:.2f}-"
            f"{r['delta_max_over_lr_t'][1]:.2f} | {r['clipped_values']} / {r['uploaded_values']:,} |")
    lines += ["", "| setting | seeds | final Dice mean | std over seeds |", "| --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["setting"] for r in runs):
        finals = [r["dice_final"] for r in runs if r["setting"] == name]
        spread = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        lines.append(f"| {name} | {len(finals)} | {statistics.mean(finals):.4f} | {spread:.4f} |")
    lines += ["", "Both settings see the same data, seeds and DP noise calibration; only the packing differs "
              "(and with it the random draws of stochastic rounding). The delta columns check the plan's "
              "derivation on the real updates (T: the site's steps that round).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
