"""FedMSA on demo-like data: from the shipped pretrained tiny SAM vs from a random encoder.

Writes a 3-site synthetic federation like the demo's (``synth_federation(out, sites=3, seed=0,
shape=(64, 64, 40))``, loaded with ``load_site(site, image_size=64, seed=0)``), then runs FedAvg
in-process (plaintext weighted means of the sites' updates: what the secure federation computes
under CKKS) with the demo's budget: 5 rounds x 5 local epochs, batch 32, Adam lr 1e-2, FedMSA
(adapters + mask decoder train, the encoder stays as initialised). Each setting starts from

* ``pretrained``: ``build_model("tiny", seed=0)`` (the shipped weights + seeded adapters), and
* ``random``: ``build_model("tiny", seed=0, pretrained=False)`` (seeded random SAM + adapters),

without DP and with DP-SGD at epsilon 8 per site (per patient, as the site daemon plans it).
The score is the mean over sites of the global model's validation Dice (``evaluate_dice``).
DP noise comes from the OS entropy pool, so DP rows vary from run to run: ``--repeats`` runs them
several times and reports each.

    python -m benchmarks.pretrained_vs_random            # writes benchmarks/results/pretrained_vs_random.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import _common
from fedfms_secure.data import load_site, synth_federation
from fedfms_secure.model import apply_mode, build_model, flatten, load_vector
from fedfms_secure.privacy.planning import open_site_privacy, plan_records
from fedfms_secure.train import TrainConfig, evaluate_dice, train_local


def fedavg(init: str, sites, *, rounds: int, epochs: int, batch: int, lr: float, epsilon: float | None,
           state_dir: Path, seed: int = 0) -> list[float]:  # fmt: skip
    """Mean validation Dice of the global model before round 1 and after each round."""
    model = build_model("tiny", seed=seed, pretrained=(init == "pretrained"))
    names = apply_mode(model, "fedmsa")
    theta = flatten(model, names)
    privacy = {}
    plans = {}
    for site in sites:  # patient-level DP, as a site daemon plans it (batch: expected patients per step)
        plans[site.name] = plan_records(site.train, unit="patient" if epsilon is not None else "slice",
                                        batch_size=batch)
        if epsilon is not None:
            privacy[site.name] = open_site_privacy(state_dir / site.name, plans[site.name], epochs=epochs,
                                                   rounds=rounds, epsilon=epsilon, delta=None, max_grad_norm=1.0)

    def score() -> float:
        load_vector(model, names, theta)
        return float(np.mean([evaluate_dice(model, s.val) for s in sites]))

    dice = [score()]
    total = sum(len(s.train) for s in sites)
    for r in range(rounds):
        update = np.zeros_like(theta)
        for site in sites:
            load_vector(model, names, theta)
            config = TrainConfig(epochs=epochs, batch_size=plans[site.name].expected_per_step, lr=lr,
                                 seed=seed + r)  # fmt: skip
            train_local(model, site.train, config, privacy.get(site.name))
            update += len(site.train) / total * (flatten(model, names) - theta)
        theta = theta + update
        dice.append(score())
        print(f"  {init:<10} eps={epsilon} round {r + 1}: dice {dice[-1]:.3f}", flush=True)
    return dice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each DP setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=_common.RESULTS / "pretrained_vs_random.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        site_dirs = synth_federation(tmp / "data", sites=3, seed=0, shape=(64, 64, 40))
        sites = [load_site(d, image_size=64, seed=0) for d in site_dirs]
        print("sites:", [(s.name, len(s.train), len(s.val)) for s in sites], flush=True)
        for eps, repeats in ((None, 1), (args.epsilon, args.repeats)):
            for rep in range(repeats):
                for init in ("pretrained", "random"):
                    state = tmp / f"privacy-{init}-{rep}"
                    dice = fedavg(init, sites, rounds=args.rounds, epochs=args.epochs, batch=args.batch,
                                  lr=args.lr, epsilon=eps, state_dir=state)  # fmt: skip
                    rows.append({"init": init, "epsilon": eps, "repeat": rep + 1, "dice": dice})
        sizes = [(s.name, len(s.train), len(s.val)) for s in sites]
    seconds = time.perf_counter() - start
    head = _common.header(seeds=0, argv=_common.script_argv(__file__, argv), threads=args.threads,
                          minutes=f"{seconds / 60:.1f} in all")
    lines = [
        "# FedMSA from the pretrained tiny SAM vs from a random encoder",
        "",
        *_common.header_markdown(head),
        "",
        "Seed 0 for data, split, model and Adam; DP noise from OS entropy.",
        "",
        f"Data: `synth_federation(sites=3, seed=0, shape=(64, 64, 40))`, `load_site(image_size=64, "
        f"seed=0)`: training/validation slices per site {', '.join(f'{n} {a}/{b}' for n, a, b in sizes)}.",
        f"Training: in-process FedAvg (weighted by training slices), {args.rounds} rounds x "
        f"{args.epochs} local epochs, batch {args.batch}, Adam lr {args.lr}, mode fedmsa; DP rows: "
        f"DP-SGD at epsilon {args.epsilon} per site (delta 1e-5, clip 1.0), sigma calibrated for "
        "the whole run as the site daemon does.",
        "Score: mean over the 3 sites of the global model's validation Dice (slices with "
        "foreground), before round 1 and after each round.",
        "",
        "| start | epsilon | run | Dice before | after rounds 1..R | final |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        eps = "inf (no DP)" if row["epsilon"] is None else f"{row['epsilon']:g}"
        rounds = ", ".join(f"{d:.3f}" for d in row["dice"][1:])
        lines.append(f"| {row['init']} | {eps} | {row['repeat']} | {row['dice'][0]:.3f} | {rounds} | "
                     f"**{row['dice'][-1]:.3f}** |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
