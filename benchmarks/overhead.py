"""What privacy costs in time, as ratios measured in one run: DP step / non-DP step, round with CKKS /
round without, FedMSA round / FedSAM round.

    .venv/bin/python -m benchmarks.overhead [--repeats 5] [--epochs 5] [--out benchmarks/results]

These machines are shared and noisy, so every configuration is measured in the same process,
interleaved (A B C ... A B C ...) ``--repeats`` times; on the CPU each part is timed in CPU seconds of
the process (torch on one thread: ``--threads``), which other work on the machine barely inflates,
and each time is the fastest of its repeats.

One *round* is one site's critical path through a round of a ``--sites`` federation, in process
(no network, no polling): load theta, ``train_local`` for ``--epochs`` local epochs on the site's
training slices (Adam, or DP-SGD through Opacus at epsilon 8 for the planned run), the weighted
delta encrypted with the site codec, the server's parsing and adding of the ``--sites`` uploads
(the same vector re-encrypted per site) and its dump of the sum, the site's decryption of that
sum, and the site's evaluation of the new model on its validation slices. CKKS is packed CKKS with
the parameters ``fedfms-secure demo`` provisions; "plain" is the ``--no-he`` codec. A *DP step* is
one logical optimizer step of ``train_local`` at the same expected batch (Poisson-sampled with DP).

Presets: ``tiny`` on CPU (a synthetic site from ``fedfms-secure data synth``, 64 px); ``vit_b``
(1024 px, ``--vit-b-slices`` slices, batch ``--vit-b-batch``) on a GPU when
``torch.cuda.is_available()``, else it is skipped and the output says so. Writes
``overhead.json`` and ``overhead.md`` (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common

MODES = ("fedmsa", "fedsam")


@dataclass(frozen=True)
class Setting:
    """How one preset is measured."""

    preset: str
    device: str
    slices: int | None  # training slices kept (None: all of the site's)
    val_slices: int | None
    epochs: int
    batch_size: int
    max_physical_batch: int
    repeats: int
    img_size: int | None = None  # None: the preset's


@dataclass(frozen=True)
class Config:
    mode: str
    dp: bool
    he: bool

    @property
    def label(self) -> str:
        return f"{self.mode} {'DP' if self.dp else 'no-DP'} {'CKKS' if self.he else 'plain'}"


def _site_data(tmp: Path, setting: Setting, image_size: int, seed: int) -> tuple[Any, Any]:
    from torch.utils.data import Subset

    from fedfms_secure.data import load_site, synth_federation

    site = synth_federation(tmp / "data", sites=1, seed=seed, shape=(64, 64, 40))[0]
    data = load_site(site, image_size=image_size, seed=seed)
    train, val = data.train, data.val
    if setting.slices is not None and setting.slices < len(train):
        train = Subset(train, list(range(setting.slices)))
    if setting.val_slices is not None and setting.val_slices < len(val):
        val = Subset(val, list(range(setting.val_slices)))
    return train, val


class _Bench:
    """One preset's model, data and codecs, and the timed round."""

    def __init__(self, setting: Setting, tmp: Path, *, sites: int, rounds: int, seed: int) -> None:
        import torch

        from fedfms_secure.he import (context_fingerprint, load_context, make_site_codec, make_aggregator,
                                          new_secret_context, serialize_params_only)  # fmt: skip
        from fedfms_secure.he.packing import fit_params
        from fedfms_secure.he.packing import DEFAULT_UPDATE_BOUND
        from fedfms_secure.model import apply_mode, build_model, flatten
        from fedfms_secure.train import TrainConfig

        logging.getLogger("fedfms_secure").setLevel(logging.ERROR)
        self.setting = setting
        self.tmp = tmp
        self.sites = sites
        self.device = torch.device(setting.device)
        self.models = {}
        self.names = {}
        self.theta0 = {}
        for mode in MODES:
            model = build_model(setting.preset, seed=seed, pretrained=None if setting.preset == "tiny" else False,
                                img_size=setting.img_size)  # fmt: skip
            names = apply_mode(model, mode)
            self.models[mode] = model.to(self.device)
            self.names[mode] = names
            self.theta0[mode] = flatten(model, names).astype(np.float64)
        image_size = self.models[MODES[0]].preset.img_size
        self.train, self.val = _site_data(tmp, setting, image_size, seed)
        self.config = TrainConfig(epochs=setting.epochs, batch_size=min(setting.batch_size, len(self.train)),
                                  lr=1e-2, seed=seed, max_physical_batch=setting.max_physical_batch)  # fmt: skip
        params = fit_params(bound=DEFAULT_UPDATE_BOUND, sites=sites, rounds=rounds)
        ctx = new_secret_context(params)
        fingerprint = context_fingerprint(ctx)
        self.codecs = {True: make_site_codec("ckks", ctx, fingerprint, params=params),
                       False: make_site_codec("plain", None, "plain")}  # fmt: skip
        self.aggregators = {True: make_aggregator("ckks", load_context(serialize_params_only(ctx), source="server"),
                                          fingerprint, params),
                        False: make_aggregator("plain", None)}  # fmt: skip
        self.bound = DEFAULT_UPDATE_BOUND
        self._dp_runs = 0

    def round(self, cfg: Config) -> dict[str, float]:
        """Times one round of ``cfg``; returns its parts in seconds (CPU seconds on the CPU) and the steps taken."""
        import torch

        from fedfms_secure.model import flatten, load_vector
        from fedfms_secure.privacy import PrivacyConfig, SitePrivacy
        from fedfms_secure.train import evaluate_dice, steps_per_epoch, train_local

        model, names, theta = self.models[cfg.mode], self.names[cfg.mode], self.theta0[cfg.mode]
        codec, aggregator = self.codecs[cfg.he], self.aggregators[cfg.he]
        privacy = None
        if cfg.dp:  # a fresh accountant per measured round: each is a whole planned run at epsilon 8
            self._dp_runs += 1
            per_epoch = steps_per_epoch(len(self.train), self.config.batch_size)
            # a timing at the same expected batch as the non-DP step: slice records (one slice per record
            # at patient level too, so a step costs the same)
            privacy = SitePrivacy.open(self.tmp / f"privacy_{self._dp_runs}",
                                       PrivacyConfig(target_epsilon=8.0, unit="slice"),
                                       sample_rate=self.config.batch_size / len(self.train),
                                       planned_steps=self.config.epochs * per_epoch)  # fmt: skip
        # on the CPU: the process's CPU time (torch on one thread), which other work on a shared machine
        # barely changes; on a GPU: wall time after synchronising
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        wall0 = time.perf_counter()
        _sync(self.device)
        t0 = clock()
        load_vector(model, names, theta)
        result = train_local(model, self.train, self.config, privacy)
        _sync(self.device)
        t1 = clock()
        update = np.clip((flatten(model, names).astype(np.float64) - theta) / self.sites, -self.bound, self.bound)
        encrypt_s = server_s = decrypt_s = 0.0
        step = codec.chunk_values
        for start in range(0, update.size, step):  # streamed chunk by chunk, as the daemons do
            part = update[start : start + step]
            total = None
            for _ in range(self.sites):
                a = clock()
                payload = codec.encrypt_vector(part)[0]
                b = clock()
                parsed = aggregator.parse(payload)
                total = parsed if total is None else aggregator.add(total, parsed)
                c = clock()
                encrypt_s += b - a
                server_s += c - b
            a = clock()
            dumped = aggregator.dump(total)
            b = clock()
            decoded = codec.decrypt_vector([dumped], part.size)
            c = clock()
            server_s += b - a
            decrypt_s += c - b
            update[start : start + step] = decoded  # the sum of the sites' weighted deltas
        encrypt_s /= self.sites  # sites encrypt in parallel: one site's share is on the critical path
        t2 = clock()
        with torch.no_grad():
            load_vector(model, names, theta + update)
        dice = evaluate_dice(model, self.val)
        _sync(self.device)
        t3 = clock()
        train_s = t1 - t0
        crypto_s = encrypt_s + server_s + decrypt_s
        return {
            "train_s": train_s,
            "steps": result.steps,
            "step_s": train_s / max(result.steps, 1),
            "encrypt_s": encrypt_s,
            "server_s": server_s,
            "decrypt_s": decrypt_s,
            "crypto_s": crypto_s,
            "eval_s": t3 - t2,
            "round_s": train_s + crypto_s + (t3 - t2),
            "wall_round_s": time.perf_counter() - wall0,
            "dice": dice,
        }


def _sync(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measure(setting: Setting, *, sites: int, rounds: int, seed: int, stream: Any = None) -> dict[str, Any]:
    """Every configuration of ``setting``, interleaved ``setting.repeats`` times; the fastest of each and ratios."""
    repeats = setting.repeats
    configs = [Config(m, dp, he) for m in MODES for dp in (False, True) for he in (False, True)]
    progress = _common.Progress(repeats * len(configs) + len(MODES), stream)
    samples: dict[Config, list[dict[str, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="fedfms-overhead-") as tmp:
        bench = _Bench(setting, Path(tmp), sites=sites, rounds=rounds, seed=seed)
        for mode in MODES:  # warm-up: first-call allocations, lazy imports, kernels
            progress.start(f"{setting.preset} warm-up {mode}")
            bench.round(Config(mode, True, False))
            progress.finish()
        for rep in range(repeats):
            for cfg in configs:
                progress.start(f"{setting.preset} {cfg.label} (repeat {rep + 1}/{repeats})")
                parts = bench.round(cfg)
                samples[cfg].append(parts)
                progress.finish(f"(round {parts['round_s']:.2f} s, train {parts['train_s']:.2f} s, "
                                f"crypto {parts['crypto_s']:.2f} s)")  # fmt: skip
        train_slices, val_slices = len(bench.train), len(bench.val)
        img_size = bench.models[MODES[0]].preset.img_size
        counts = {m: (sum(p.numel() for p in bench.models[m].parameters() if p.requires_grad),
                      bench.theta0[m].size) for m in MODES}  # fmt: skip
    rows = []
    for cfg in configs:
        best = {k: min(s[k] for s in samples[cfg]) for k in samples[cfg][0]}  # each time: its fastest repeat
        best["dice"] = samples[cfg][-1]["dice"]
        rows.append({"mode": cfg.mode, "dp": cfg.dp, "he": cfg.he, "trainable_params": counts[cfg.mode][0],
                     "communicated_params": counts[cfg.mode][1], **best,
                     "round_s_all": [s["round_s"] for s in samples[cfg]]})  # fmt: skip
    return {
        "preset": setting.preset,
        "device": setting.device if setting.device == "cpu" else _common.gpu_name(),
        "img_size": img_size,
        "train_slices": train_slices,
        "val_slices": val_slices,
        "epochs": setting.epochs,
        "batch_size": min(setting.batch_size, train_slices),
        "repeats": repeats,
        "rows": rows,
        "ratios": ratios(rows),
    }


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three ratios of the issue, each per the settings the others leave free."""
    by = {(r["mode"], r["dp"], r["he"]): r for r in rows}
    out = []
    for mode in MODES:
        dp = min(by[(mode, True, he)]["step_s"] for he in (False, True))
        plain = min(by[(mode, False, he)]["step_s"] for he in (False, True))
        out.append({"ratio": "DP step / non-DP step", "setting": mode, "value": dp / plain,
                    "numerator_s": dp, "denominator_s": plain})  # fmt: skip
    for mode in MODES:
        for dp in (False, True):
            on, off = by[(mode, dp, True)], by[(mode, dp, False)]
            a, b = on["round_s"], off["round_s"]
            # the two rounds train and evaluate the same way: with the time they share (the mean of their
            # fastest times), the ratio shows what the codec adds without the noise of two training runs
            shared = (on["train_s"] + on["eval_s"] + off["train_s"] + off["eval_s"]) / 2
            same = (shared + on["crypto_s"]) / (shared + off["crypto_s"])
            out.append({"ratio": "round with CKKS / round without", "setting": f"{mode}, {'DP' if dp else 'no DP'}",
                        "value": a / b, "numerator_s": a, "denominator_s": b, "same_training": same})  # fmt: skip
    for dp in (False, True):
        for he in (False, True):
            a, b = by[("fedmsa", dp, he)]["round_s"], by[("fedsam", dp, he)]["round_s"]
            out.append({"ratio": "FedMSA round / FedSAM round",
                        "setting": f"{'DP' if dp else 'no DP'}, {'CKKS' if he else 'plain'}",
                        "value": a / b, "numerator_s": a, "denominator_s": b})  # fmt: skip
    return out


def markdown(head: dict[str, Any], results: list[dict[str, Any]], skipped: list[str]) -> str:
    lines = ["# What privacy costs in time: ratios measured in one run", "", *_common.header_markdown(head), ""]
    lines.append(
        "A round is one site's critical path, in process: load theta, local training, encrypt the "
        "weighted delta, the server's sum of the sites' uploads, decrypt, evaluate on the validation "
        "slices (no network or polling: the federated grid in `privacy_budget.md` has the daemons' "
        "wall-clock rounds). DP = Opacus DP-SGD at epsilon 8; CKKS = packed CKKS as the demo provisions "
        "it; plain = the `--no-he` codec. On the CPU every time is the process's CPU time (torch on one thread), "
        "which other work on a shared machine barely inflates (`wall_round_s` in the JSON has the wall clock); "
        "on a GPU, wall time. Each time is the fastest of its interleaved repeats (a DP step: the faster of the "
        "CKKS and plain rounds'). The two rounds "
        "of a CKKS ratio train and evaluate identically, so the last column also gives it with that time shared "
        "(the mean of the two): what the codec itself adds, free of the noise between two training runs."
    )
    for note in skipped:
        lines += ["", f"**{note}**"]
    for res in results:
        lines += [
            "",
            f"## {res['preset']} on {res['device']}",
            "",
            f"{res['img_size']} px, {res['train_slices']} training / {res['val_slices']} validation slices, "
            f"{res['epochs']} local epoch(s), batch {res['batch_size']}, {res['repeats']} repeat(s); times in "
            + ("CPU seconds of the process." if res["device"] == "cpu" else "wall seconds."),
            "",
            "| what | setting | ratio | numerator s | denominator s | with training and evaluation shared |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in res["ratios"]:
            same = f"{r['same_training']:.3f}x" if "same_training" in r else ""
            lines.append(f"| {r['ratio']} | {r['setting']} | **{r['value']:.2f}x** | {r['numerator_s']:.3f} "
                         f"| {r['denominator_s']:.3f} | {same} |")  # fmt: skip
        lines += [
            "",
            "| mode | DP | aggregation | trainable | communicated | s / step | train s | encrypt s | server s "
            "| decrypt s | eval s | round s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['mode']} | {'yes' if r['dp'] else 'no'} | {'CKKS' if r['he'] else 'plain'} "
                f"| {r['trainable_params']:,} | {r['communicated_params']:,} | {r['step_s']:.3f} | {r['train_s']:.2f} "
                f"| {r['encrypt_s']:.3f} | {r['server_s']:.3f} | {r['decrypt_s']:.3f} | {r['eval_s']:.2f} "
                f"| {r['round_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per configuration (default 5)")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round, tiny preset (default 5, as the demo)")
    parser.add_argument("--batch", type=int, default=32, help="batch size, tiny preset (default 32, as the demo)")
    parser.add_argument("--slices", type=int, default=None, help="training slices kept, tiny preset (default all)")
    parser.add_argument("--sites", type=int, default=3, help="sites whose uploads the server sums (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the CKKS parameters allow (default 5)")
    parser.add_argument("--vit-b-slices", type=int, default=16, help="vit_b training slices (default 16)")
    parser.add_argument("--vit-b-batch", type=int, default=4, help="vit_b batch size (default 4)")
    parser.add_argument("--vit-b-repeats", type=int, default=1,
                        help="vit_b repeats (default 1: a FedSAM CKKS round encrypts 94M values per site)")
    parser.add_argument("--vit-b-img-size", type=int, default=1024, help="vit_b input size (default 1024)")
    parser.add_argument("--no-vit-b", action="store_true", help="measure the tiny preset only")
    parser.add_argument("--vit-b-device", choices=["auto", "cpu"], default="auto",
                        help="auto: vit_b on the GPU when there is one; cpu: on the CPU anyway (slow; with a small "
                             "--vit-b-img-size, a check that the vit_b path runs)")
    parser.add_argument("--toy", action="store_true", help="a few seconds: 8 slices, 1 epoch, 1 repeat, no vit_b")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as each site process of the demo runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--name", default="overhead", help="stem of the output files (default overhead)")
    args = parser.parse_args(argv)
    if args.toy:
        args.repeats, args.epochs, args.slices, args.no_vit_b = 1, 1, args.slices or 8, True
    if min(args.repeats, args.epochs, args.batch, args.sites, args.rounds, args.threads) < 1:
        parser.error("--repeats, --epochs, --batch, --sites, --rounds and --threads must be at least 1")
    import torch

    from fedfms_secure.errors import FedFmsError

    torch.set_num_threads(args.threads)
    settings = [Setting("tiny", "cpu", args.slices, 4 * args.slices if args.slices else None, args.epochs,
                        args.batch, 16, args.repeats)]  # fmt: skip
    skipped = []
    if args.no_vit_b:
        skipped.append("vit_b not measured (--no-vit-b)")
    elif torch.cuda.is_available() or args.vit_b_device == "cpu":
        settings.append(Setting("vit_b", "cuda" if args.vit_b_device == "auto" else args.vit_b_device, args.vit_b_slices, args.vit_b_slices, 1, args.vit_b_batch,
                                args.vit_b_batch, args.vit_b_repeats, img_size=args.vit_b_img_size))  # fmt: skip
    else:
        skipped.append("no GPU: vit_b skipped (torch.cuda.is_available() is False on this machine)")
    head = _common.header(seeds=args.seed, argv=_common.script_argv(__file__, argv),
                          sites=args.sites)  # fmt: skip
    started = time.monotonic()
    results = []
    try:
        for setting in settings:
            results.append(measure(setting, sites=args.sites, rounds=args.rounds, seed=args.seed))
    except FedFmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    head["runtime"] = f"{time.monotonic() - started:.0f} s"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"header": head, "skipped": skipped, "results": results}, indent=2) + "\n")  # fmt: skip
    text = markdown(head, results, skipped)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
