"""Runs the demo federation under three privacy settings and records what each costs.

    .venv/bin/python -m benchmarks.demo_matrix [--rounds 5] [--clients 3] [--out benchmarks/results]

Settings (same data, seed and plan; only the privacy machinery differs):
  dp+ckks    target epsilon 8 per site, CKKS aggregation (the default `make demo`)
  ckks       no DP (epsilon = inf), CKKS aggregation
  plain      no DP, plaintext aggregation (--no-he)

Without DP, training is deterministic per seed, so `ckks` against `plain` isolates the effect of
encryption on the result (CKKS adds approximation error of order 1e-7 per value). Writes
``demo_matrix.json`` and ``demo_matrix.md`` with the machine, the commit and this command.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from benchmarks import _common
from fedfms_secure.demo import DemoOptions, run_demo

SETTINGS = {
    "dp+ckks": {"epsilon": 8.0, "he": True},
    "ckks": {"epsilon": math.inf, "he": True},
    "plain": {"epsilon": math.inf, "he": False},
}


def main(argv: list[str] | None = None) -> int:
    """Runs the demo in each setting and writes ``demo_matrix.{json,md}`` to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfms-bench-") as tmp:
        for name, setting in SETTINGS.items():
            print(f"running {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            report = run_demo(
                DemoOptions(out=Path(tmp) / name, clients=args.clients, rounds=args.rounds, seed=args.seed, **setting),
                console=Console(file=io.StringIO()),
            )
            rows.append(_row(name, report, time.monotonic() - started))
    header = _common.header(
        seeds=args.seed, argv=_common.script_argv(__file__, argv),
        preset="tiny (64 px), synthetic NIfTI sites from `fedfms-secure data synth`",
        clients=args.clients, rounds=args.rounds,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_matrix.json").write_text(json.dumps({"header": header, "runs": rows}, indent=2) + "\n")
    (args.out / "demo_matrix.md").write_text(_markdown(header, rows))
    print((args.out / "demo_matrix.md").read_text())
    return 0


def _row(name: str, report: dict, wall: float) -> dict:
    rounds = report["rounds"]
    return {
        "setting": name,
        "dice_initial": report["dice_initial"],
        "dice_per_round": [r["dice_mean"] for r in rounds],
        "dice_final": rounds[-1]["dice_mean"],
        "epsilon_final_max": rounds[-1]["epsilon_max"],
        "bytes_up_per_site_per_round": rounds[-1]["bytes_up_total"] / rounds[-1]["sites_reporting"],
        "bytes_down_per_site_per_round": rounds[-1]["bytes_down_total"] / rounds[-1]["sites_reporting"],
        "seconds_per_round_mean": sum(r["seconds"] for r in rounds) / len(rounds),
        "wall_seconds": wall,
    }


def _markdown(header: dict, rows: list[dict]) -> str:
    lines = [
        "# Demo federation: what privacy costs",
        "",
        *_common.header_markdown(header),
        "",
        "| setting | Dice round 0 | Dice per round | final Dice | epsilon (max site) | bytes up / site / round "
        "| bytes down / site / round | s / round | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eps = "inf (no DP)" if r["epsilon_final_max"] is None else f"{r['epsilon_final_max']:.2f}"
        lines.append(
            f"| {r['setting']} | {r['dice_initial']:.4f} | {', '.join(f'{d:.4f}' for d in r['dice_per_round'])} "
            f"| {r['dice_final']:.4f} | {eps} | {r['bytes_up_per_site_per_round']:,.0f} "
            f"| {r['bytes_down_per_site_per_round']:,.0f} | {r['seconds_per_round_mean']:.1f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
