"""Federated against centralized against each site alone, on real anatomy, at equal epochs, with and
without patient-level DP, FedMSA and FedSAM.

    .venv/bin/python -m benchmarks.fed_vs_central                    # seeds 0 1 2, 25 epochs (5 rounds x 5)
    .venv/bin/python -m benchmarks.fed_vs_central --cases 3 --kinds central local federated --levers keep-adam
    .venv/bin/python -m benchmarks.fed_vs_central --seeds 0 --quick  # a look in a few minutes

The data is `fedfms-secure data anatomy` (the MNI T1 template cut into deformed patients at sites
with scanner-like shifts; white matter), ``--cases`` patients per site (default 40: 30 training and
10 validation patients, enough for patient-level DP), written for each seed from that seed (or once
from ``--data-seed``). For each seed (the patients and scanners, the model's initialisation, every
site's train/validation split and the batch order), the kinds of ``--kinds`` (default: all of
``KINDS``), every one at batch ``--batch`` (expected patients per step under DP):

* ``central`` / ``central-dp``: `train central`, every site's training data pooled, ``epochs`` epochs,
  without DP / with patient-level DP at ``--epsilon`` (the pooled patients are the records);
* ``local`` / ``local-dp``: `train local`, each site alone, likewise;
* ``federated`` and its variants: the real demo (server and site processes, mutual TLS, CKKS
  sums), ``rounds`` x ``local_epochs`` = ``epochs``: FedMSA without DP, FedMSA at batch 8 (4x the
  steps), FedSAM, and with patient-level DP at ``--epsilon``: FedMSA, FedMSA with the PRV
  accountant, FedSAM (see ``DEMOS``);
* levers (``--levers``, none by default), in-process FedAvg (the sites' ``train_local``, exact plaintext sample-weighted mean; the
  demo's plan otherwise): ``fedavg`` as the demo does it, then one change each: Adam state kept
  at each site across rounds, another learning rate, one local epoch per round (25 rounds), a
  server step size above 1 (each site scales its weighted delta, so the server still only adds).

Every number is the mean over sites of the model's Dice on each site's validation slices (the
demo's "Dice"; for ``local``, each site's own model on its own validation slices; the best site's
model is also scored on every site's validation slices, as the federation's model is). Optimizer steps
are counted per training run: central's pooled steps, and per site for local and federated.
Writes ``fed_vs_central.{md,json}`` to ``--out`` (``fed_vs_central_<E>ep.*`` for other than 25
epochs); runs are appended to the ``.jsonl`` beside them as they finish, so an interrupted grid
keeps what ran.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common

BATCH = 32  # the plan's batch size (ServerConfig.batch_size), as the baselines'


@dataclass(frozen=True)
class Demo:
    """One federation through the real daemons (``fedfms-secure demo``)."""

    label: str
    mode: str = "fedmsa"
    dp: bool = False  # patient-level DP-SGD at --epsilon
    accountant: str = "rdp"
    batch: int | None = None  # None: --batch
    lr: float | None = None  # None: the plan's default
    slices_per_patient: int = 1
    epsilon: float | None = None  # None: --epsilon (DP runs only)
    epoch_factor: int = 1  # local epochs x this (more DP-SGD steps: one epoch is one pass over the patients)
    per_round: int | None = None  # local epochs per round, the rounds then making the same epochs (None: the plan's)


DEMOS = {
    "federated": Demo("federated FedMSA, CKKS, no DP"),
    "federated-b8": Demo("federated FedMSA, CKKS, no DP, batch 8 at the sites", batch=8),
    "fedsam": Demo("federated FedSAM, CKKS, no DP", mode="fedsam"),
    "federated-b8-r25": Demo("federated FedMSA, CKKS, no DP, batch 8, one local epoch per round (5x the rounds)",
                             batch=8, per_round=1),
    "federated-dp": Demo("federated FedMSA, CKKS, patient-level DP", dp=True),
    "federated-dp-prv": Demo("federated FedMSA, CKKS, patient-level DP, PRV accountant", dp=True, accountant="prv"),
    "fedsam-dp": Demo("federated FedSAM, CKKS, patient-level DP", mode="fedsam", dp=True),
    # DP levers (``--kinds``; not in the default grid)
    "federated-dp-b8": Demo("federated FedMSA, patient-level DP, 8 expected patients per step", dp=True, batch=8),
    "federated-dp-lr1e-2": Demo("federated FedMSA, patient-level DP, learning rate 1e-2", dp=True, lr=1e-2),
    "federated-dp-m4": Demo("federated FedMSA, patient-level DP, 4 slices per patient averaged before clipping",
                            dp=True, slices_per_patient=4),
    "federated-dp-eps1000": Demo("federated FedMSA, patient-level DP at epsilon 1000 (almost no noise: the "
                                 "clipping and sampling alone)", dp=True, epsilon=1000.0),
    "federated-dp-b8-x4": Demo("federated FedMSA, patient-level DP, 8 expected patients per step, 4x the local "
                               "epochs (16x the steps)", dp=True, batch=8, epoch_factor=4),
    "federated-dp-eps1000-b8-x4": Demo("federated FedMSA, patient-level DP at epsilon 1000, 8 patients per step, "
                                       "4x the local epochs", dp=True, epsilon=1000.0, batch=8, epoch_factor=4),
}
BASELINES = {
    "central": "central FedMSA (`train central`), no DP",
    "local": "local only FedMSA (`train local`, own site's model), no DP",
    "central-dp": "central FedMSA (`train central`), patient-level DP",
    "local-dp": "local only FedMSA (`train local`, own site's model), patient-level DP",
}
KINDS = ("central", "local", "federated", "federated-b8", "fedsam", "central-dp", "local-dp", "federated-dp",
         "federated-dp-prv", "fedsam-dp")
DP_LEVERS = ("federated-dp-b8", "federated-dp-lr1e-2", "federated-dp-m4", "federated-dp-eps1000",
             "federated-dp-b8-x4", "federated-dp-eps1000-b8-x4")


@dataclass(frozen=True)
class Lever:
    """One in-process FedAvg variant."""

    label: str
    rounds: int | None = None  # None: the grid's rounds
    lr: float | None = None  # None: the plan's default
    keep_adam: bool = False  # each site resumes its own Adam state every round
    server_lr: float = 1.0  # global step = server_lr x the weighted mean of the deltas
    batch: int = BATCH  # a site's batch size (more, smaller steps per epoch)


LEVERS = {
    "fedavg": Lever("FedAvg as the demo runs it (fresh Adam each round)"),
    "keep-adam": Lever("each site keeps its Adam state across rounds", keep_adam=True),
    "lr-1e-2": Lever("learning rate 1e-2 (default 3e-3)", lr=1e-2),
    "1-epoch-rounds": Lever("1 local epoch per round, 5x the rounds", rounds=-1),
    "server-lr-2": Lever("server step size 2", server_lr=2.0),
    "batch-8": Lever("batch size 8 at the sites (4x the steps per epoch)", batch=8),
    "keep-adam+server-lr-2": Lever("Adam state kept and server step size 2", keep_adam=True, server_lr=2.0),
}
# what the grid at 3 cases per site ran (the demo itself is the FedAvg reference: in-process FedAvg repeats its Dice)
SMALL_DATA_LEVERS = ("keep-adam", "batch-8", "server-lr-2", "lr-1e-2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--data-seed", type=int, help="seed of `data anatomy` (default: each training seed's own, "
                        "so the spread covers other patients and scanners too)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", type=int, default=40, help="patients per site (default 40)")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=(*BASELINES, *DEMOS),
                        help=f"runs through the daemons and baselines (default: {' '.join(KINDS)}; DP levers: "
                             f"{' '.join(DP_LEVERS)})")
    parser.add_argument("--levers", nargs="*", default=[], choices=list(LEVERS),
                        help=f"in-process FedAvg variants (default none; the 3-case grid: {' '.join(SMALL_DATA_LEVERS)})")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon of the DP runs (default 8)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch of every run (default {BATCH})")
    parser.add_argument("--name", help="output stem (default fed_vs_central, with the cases and epochs when "
                        "other than 40 and 25)")
    parser.add_argument("--with", dest="merge", type=Path, metavar="JSONL",
                        help="keep the runs of an earlier invocation (its .jsonl, same seeds and data) whose kinds "
                             "this one does not run, and report them together")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 2 local epochs, fedavg and keep-adam only")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (default 1)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.local_epochs, args.levers = 2, 2, ["fedavg", "keep-adam"]
    epochs = args.rounds * args.local_epochs
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("fed_vs_central" + ("" if args.cases == 40 else f"_{args.cases}cases")
                         + ("" if epochs == 25 else f"_{epochs}ep"))
    log = args.out / f"{stem}.jsonl"
    kinds = to_run = [*args.kinds, *args.levers]
    kept = []
    if args.merge is not None:
        kept = [r for r in map(json.loads, args.merge.read_text().splitlines())
                if r["seed"] in args.seeds and r["kind"] not in kinds]
    log.unlink(missing_ok=True)
    if kept:
        log.write_text("".join(json.dumps(r) + "\n" for r in kept))
        order = [*KINDS, *DEMOS, *LEVERS]
        kinds = sorted({r["kind"] for r in kept} | set(kinds), key=lambda k: order.index(k) if k in order else 99)
    with tempfile.TemporaryDirectory(prefix="fedfms-fvc-") as tmp:
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = list(pool.map(_seed_runs, [(seed, to_run, Path(tmp), args, log) for seed in args.seeds]))
        else:
            parts = [_seed_runs((seed, to_run, Path(tmp), args, log)) for seed in args.seeds]
    runs = kept + [run for part in parts for run in part]
    merged = ({"merged": f"the {', '.join(sorted({r['kind'] for r in kept}))} runs are read from {args.merge.name} "
                         "(an earlier invocation on the same seeds and data)"} if kept else {})
    head = _common.header(**merged,
        seeds=args.seeds, argv=_common.script_argv(__file__, argv),
        preset="tiny (64 px), FedMSA unless a row says FedSAM",
        data=f"`fedfms-secure data anatomy --sites {args.sites} --cases {args.cases} --slices {args.slices} "
             f"--seed {'SEED' if args.data_seed is None else args.data_seed}` (white matter; 64 x 64 x {args.slices} "
             f"per case; {_split(args.cases)} per site)",
        plan=f"{epochs} epochs: federated {args.rounds} rounds x {args.local_epochs} local epochs, batch {args.batch} "
             f"(expected patients per step under DP, capped at a site's training patients); DP: patient level, "
             f"target epsilon {args.epsilon:g} for the whole run, delta min(1e-5, 1/(10 n))",
    )
    runs.sort(key=lambda r: (r["seed"], kinds.index(r["kind"])))
    summary = summarize(runs, kinds)
    (args.out / f"{stem}.json").write_text(json.dumps({"header": head, "summary": summary, "runs": runs}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(head, summary, runs, kinds))
    print((args.out / f"{stem}.md").read_text())
    return 0


def _split(cases: int) -> str:
    """Training and validation patients of a site of ``cases`` (the loader's 25% validation split)."""
    val = max(1, round(cases * 0.25)) if cases > 1 else 0
    return f"{cases - val} training and {val} validation patients"


def _seed_runs(job: tuple[int, list[str], Path, argparse.Namespace, Path]) -> list[dict[str, Any]]:
    """Every kind of run for one seed, on its data, each appended to ``log`` as it finishes."""
    from fedfms_secure.data.anatomy import anatomy_federation

    seed, kinds, tmp, args, log = job
    data_seed = seed if args.data_seed is None else args.data_seed
    data = tmp / f"data-{seed}"
    anatomy_federation(data, sites=args.sites, cases=args.cases, seed=data_seed, slices=args.slices)
    # one thread: the demo's site processes run one each too, and a multi-threaded torch on cores
    # that other processes share spends most of its time waiting (4x slower measured here)
    import torch

    torch.set_num_threads(1)
    epochs = args.rounds * args.local_epochs
    progress = _common.Progress(len(kinds))
    runs = []
    for kind in kinds:
        progress.start(f"seed {seed}: {kind}")
        started = time.monotonic()
        run = _run(kind, data, tmp / f"{kind}-{seed}", seed, args)
        run.update(kind=kind, seed=seed, data_seed=data_seed, epochs=epochs, wall_seconds=round(time.monotonic() - started, 1))
        runs.append(run)
        with open(log, "a") as fh:
            fh.write(json.dumps(run) + "\n")
        progress.finish(f"Dice {run['dice']:.4f}")
    return runs


def _run(kind: str, data: Path, out: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.rounds * args.local_epochs
    if kind in BASELINES:
        from fedfms_secure.train.baselines import BaselineOptions, run_local_baselines, train_central
        from fedfms_secure.train.local import steps_per_epoch

        dp = kind.endswith("-dp")
        options = BaselineOptions(epochs=epochs, batch_size=args.batch, seed=seed, out=out,
                                  epsilon=args.epsilon if dp else None)
        central = kind.startswith("central")
        result = (train_central if central else run_local_baselines)(data, options, progress=lambda m: None)
        per_site = {s["name"]: s["dice_mean"] for s in result["sites"]}
        # DP steps: per epoch ceil(patients / expected patients per step); without DP, per slice batches
        counts = {s["name"]: s["train_patients"] if dp else s["train_slices"] for s in result["sites"]}
        extra = {"epsilon_spent": result.get("epsilon")} if dp else {}
        if central:
            return {"dice": statistics.fmean(per_site.values()), "per_site": per_site, **extra,
                    "steps": {"central": epochs * steps_per_epoch(sum(counts.values()), args.batch)}}
        return {"dice": statistics.fmean(per_site.values()), "per_site": per_site, **extra,
                "steps": {n: epochs * steps_per_epoch(k, args.batch) for n, k in counts.items()},
                "everywhere": _everywhere(out, data, list(per_site))}
    if kind in DEMOS:
        return _demo(DEMOS[kind], data, out, seed, args)
    return _fedavg(LEVERS[kind], data, seed, args)



def _everywhere(out: Path, data: Path, sites: list[str]) -> dict[str, float]:
    """Each site's local model scored as the federation's model is: mean over all sites of the
    validation Dice (the same splits)."""
    from fedfms_secure.commands.train import evaluate_model_file

    return {model_site: statistics.fmean(
        evaluate_model_file(out / f"local_{model_site}_model.pt", data / site, split="val",
                            split_file=out / "splits" / f"{site}.json")["sites"][0]["dice_mean"] for site in sites)
        for model_site in sites}


def _demo(demo: Demo, data: Path, out: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from fedfms_secure.demo import DemoOptions, run_demo
    from fedfms_secure.train.local import steps_per_epoch

    batch = demo.batch or args.batch
    epsilon = (demo.epsilon or args.epsilon) if demo.dp else math.inf
    rounds, local_epochs = args.rounds, args.local_epochs * demo.epoch_factor
    if demo.per_round is not None:  # the same epochs in more, shorter rounds
        rounds, local_epochs = rounds * local_epochs // demo.per_round, demo.per_round
    report = run_demo(DemoOptions(out=out, data=data, clients=args.sites, rounds=rounds, mode=demo.mode,
                                  local_epochs=local_epochs, epsilon=epsilon, accountant=demo.accountant,
                                  batch_size=batch, learning_rate=demo.lr, slices_per_patient=demo.slices_per_patient,
                                  he=True, seed=seed),
                      console=Console(file=io.StringIO()))
    per_site = {name: site["dice_mean"] for name, site in report["final"]["sites"].items()}
    counts = {name: _train_records(out / "run" / name / "split.json", data / name, patients=demo.dp)
              for name in per_site}
    return {"dice": report["rounds"][-1]["dice_mean"], "per_site": per_site, "dice_initial": report["dice_initial"],
            "dice_per_round": [r["dice_mean"] for r in report["rounds"]],
            **({"epsilon_spent": report.get("epsilon_final_max")} if demo.dp else {}),
            "rounds": rounds, "local_epochs": local_epochs,
            "steps": {n: rounds * local_epochs * steps_per_epoch(k, batch) for n, k in counts.items()}}


def _train_records(split_file: Path, site: Path, *, patients: bool) -> int:
    """A site's training slices, or its training patients (the DP records)."""
    from fedfms_secure.data import load_site
    from fedfms_secure.privacy.units import records

    train = load_site(site, image_size=64, split_file=split_file).train
    return records(train, "patient") if patients else len(train)


def _fedavg(lever: Lever, data: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """In-process FedAvg with one lever changed; returns Dice per round and the final per-site Dice."""
    from fedfms_secure.config import FEDERATED_LEARNING_RATE
    from fedfms_secure.data import find_sites, load_site
    from fedfms_secure.model.modes import apply_mode
    from fedfms_secure.model.registry import build_model
    from fedfms_secure.model.vector import flatten, load_vector
    from fedfms_secure.train.local import TrainConfig, steps_per_epoch, train_local
    from fedfms_secure.train.metrics import score_model, summarize as summarize_scores

    epochs = args.rounds * args.local_epochs
    rounds, local_epochs = (epochs, 1) if lever.rounds == -1 else (lever.rounds or args.rounds, args.local_epochs)
    model = build_model("tiny", seed=seed)
    names = apply_mode(model, "fedmsa")
    sites = {d.name: load_site(d, image_size=model.preset.img_size, seed=seed) for d in find_sites(data)}
    configs = {n: TrainConfig(epochs=local_epochs, batch_size=min(lever.batch, len(s.train)),
                              lr=lever.lr or FEDERATED_LEARNING_RATE, seed=seed) for n, s in sites.items()}
    states: dict[str, dict | None] = {n: None for n in sites}
    theta = flatten(model, names).astype(np.float64)

    def dice_now() -> dict[str, float]:
        load_vector(model, names, theta)
        return {n: summarize_scores(score_model(model, s.val), s.class_names)["dice_mean"] for n, s in sites.items()}

    per_round = []
    for _ in range(rounds):
        total, weight = np.zeros_like(theta), 0
        for n, site in sites.items():
            load_vector(model, names, theta)
            result = train_local(model, site.train, configs[n], optimizer_state=states[n])
            if lever.keep_adam:
                states[n] = result.optimizer_state
            total += result.num_samples * (flatten(model, names).astype(np.float64) - theta)
            weight += result.num_samples
        theta = theta + lever.server_lr * total / weight
        per_round.append(statistics.fmean(dice_now().values()))
    per_site = dice_now()
    return {"dice": statistics.fmean(per_site.values()), "per_site": per_site,
            "dice_per_round": per_round if rounds <= 10 else per_round[local_epochs * 4::5],
            "rounds": rounds, "local_epochs": local_epochs,
            "steps": {n: rounds * local_epochs * steps_per_epoch(len(s.train), configs[n].batch_size)
                      for n, s in sites.items()}}


def summarize(runs: list[dict[str, Any]], kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Per kind: Dice mean and sample std over seeds, per-seed Dice, steps; for local also the best
    site's Dice (mean over seeds of each seed's best site)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        rows = [r for r in runs if r["kind"] == kind]
        if not rows:
            continue
        dice = [r["dice"] for r in rows]
        entry = {"seeds": [r["seed"] for r in rows], "dice": dice, "dice_mean": statistics.fmean(dice),
                 "dice_std": statistics.stdev(dice) if len(dice) > 1 else float("nan"), "steps": rows[0]["steps"]}
        best = [max(r["per_site"].values()) for r in rows]
        entry.update(best_site_mean=statistics.fmean(best),
                     best_site_std=statistics.stdev(best) if len(best) > 1 else float("nan"))
        if all("everywhere" in r for r in rows):
            best = [max(r["everywhere"].values()) for r in rows]
            entry.update(best_everywhere_mean=statistics.fmean(best),
                         best_everywhere_std=statistics.stdev(best) if len(best) > 1 else float("nan"))
        out[kind] = entry
    return out


def site_gains(runs: list[dict[str, Any]], kind: str, base: str) -> dict[str, Any]:
    """``kind``'s model against ``base``'s on each site's validation patients, seed by seed (the
    federation's global model on site k against site k's own model, for ``base`` local): the mean
    gain per site, and how many (seed, site) pairs ``kind`` wins."""
    by_seed = {r["seed"]: r for r in runs if r["kind"] == base}
    diffs: dict[str, list[float]] = {}
    for r in runs:
        if r["kind"] != kind or r["seed"] not in by_seed:
            continue
        for site, dice in r["per_site"].items():
            if site in by_seed[r["seed"]]["per_site"]:
                diffs.setdefault(site, []).append(dice - by_seed[r["seed"]]["per_site"][site])
    pairs = [d for values in diffs.values() for d in values]
    return {"per_site": {site: statistics.fmean(v) for site, v in diffs.items()},
            "wins": sum(d > 0 for d in pairs), "pairs": len(pairs)}


def markdown(head: dict[str, Any], summary: dict[str, dict[str, Any]], runs: list[dict[str, Any]],
             kinds: list[str]) -> str:
    def pm(mean: float, std: float) -> str:
        return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")

    def steps(s: dict[str, int]) -> str:
        return str(s["central"]) if "central" in s else " / ".join(str(v) for v in s.values()) + " per site"

    lines = ["# Federated vs centralized vs local-only, on real anatomy", "", *_common.header_markdown(head), "",
             "Dice: mean over sites of the validation Dice; mean ± sample std over seeds. Steps: optimizer steps "
             "of one training run (central: pooled; else per site, sites in order).", "",
             "| run | Dice (mean ± std) | per seed | best local site: own validation / its model on all sites "
             "| optimizer steps |",
             "| --- | --- | --- | --- | --- |"]
    for kind in kinds:
        if kind not in summary:
            continue
        s = summary[kind]
        label = (BASELINES.get(kind) or (DEMOS[kind].label if kind in DEMOS else None)
                 or (f"in-process FedAvg: {LEVERS[kind].label}" if kind in LEVERS else kind))
        best = ""
        if kind.startswith("local"):
            best = pm(s["best_site_mean"], s["best_site_std"])
            if "best_everywhere_mean" in s:
                best += " / " + pm(s["best_everywhere_mean"], s["best_everywhere_std"])
        lines.append(f"| {label} | {pm(s['dice_mean'], s['dice_std'])} | "
                     f"{', '.join(f'{d:.3f}' for d in s['dice'])} | {best} | {steps(s['steps'])} |")
    bases = [(k, b) for k in kinds if k in DEMOS or k in LEVERS
             for b in (("local-dp",) if (k in DEMOS and DEMOS[k].dp) else ("local",)) if b in kinds]
    gains = [(k, b, site_gains(runs, k, b)) for k, b in bases]
    gains = [(k, b, g) for k, b, g in gains if g["pairs"]]
    if gains:
        sites = sorted({site for _, _, g in gains for site in g["per_site"]})
        lines += ["", "Each site alone against the federation, on that site's validation patients: the federation's "
                  "Dice minus the site's own model's (local, or local with DP for the DP rows), mean over seeds, and "
                  "the (seed, site) pairs the federation wins.", "",
                  "| run | against | " + " | ".join(sites) + " | wins |",
                  "| --- | --- | " + " | ".join("---" for _ in sites) + " | --- |"]
        for k, b, g in gains:
            cells = [f"{g['per_site'][site]:+.3f}" if site in g["per_site"] else "" for site in sites]
            lines.append(f"| {k} | {b} | " + " | ".join(cells) + f" | {g['wins']} of {g['pairs']} |")
    lines += ["", "## Per run", "", "| seed | run | Dice | per site | Dice per round | wall s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        rounds = ", ".join(f"{d:.3f}" for d in r.get("dice_per_round", []))
        sites = ", ".join(f"{n} {d:.3f}" for n, d in r["per_site"].items())
        if "everywhere" in r:
            sites += "; each model on all sites: " + ", ".join(f"{n} {d:.3f}" for n, d in r["everywhere"].items())
        eps = f" (epsilon {r['epsilon_spent']:.2f})" if r.get("epsilon_spent") is not None else ""
        lines.append(f"| {r['seed']} | {r['kind']}{eps} | {r['dice']:.4f} | {sites} | {rounds} | "
                     f"{r['wall_seconds']:.0f} |")
    initial = [r["dice_initial"] for r in runs if "dice_initial" in r]
    if initial:
        lines += ["", f"Dice before training (the demo's round 0): {', '.join(f'{d:.3f}' for d in initial)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
