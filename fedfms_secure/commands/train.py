"""``fedfms-secure train central|local`` (the baselines) and ``fedfms-secure evaluate``.

``train central --data DIR`` pools every site's training slices; ``train local --data DIR`` trains
each site alone; both use the federated run's training code and print Dice, IoU and HD95 (mean and
standard deviation over validation images) per site. ``evaluate --model FILE --data SITE_DIR``
scores a saved model (a site's ``STATE/final_model.pt``, or ``OUT/*_model.pt`` of a baseline) on
the validation slices of a site (``--split val``, the default: the split pinned in the site's
``STATE/split.json``, so the Dice a site logged is reproduced), its training slices (``--split
train``) or all its slices (``--split all``: e.g. the held-out site of a leave-one-site-out run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from fedfms_secure.config import FEDERATED_LEARNING_RATE, MODES, PRESETS
from fedfms_secure.device import DEVICE_HELP

from fedfms_secure.commands.data import add_data_options
from fedfms_secure.errors import ConfigError

SPLITS = ("val", "train", "all")

# kept light: torch and the model are imported inside the handlers


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` (``central``, ``local``) and ``evaluate`` to an argparse ``subparsers``."""
    group = subparsers.add_parser("train", help="baselines with the federated run's training code")
    sub = group.add_subparsers(metavar="KIND")
    for kind, text in (("central", "pooled training over all sites' training slices"),
                       ("local", "each site trains alone on its own slices")):
        p = sub.add_parser(kind, help=text)
        p.add_argument("--data", type=Path, required=True, help="a folder of site folders")
        p.add_argument("--holdout", metavar="SITE", help="a site that never trains, scored on all its slices at the end "
                       "(default: none)")
        p.add_argument("--mode", choices=MODES, default="fedmsa",
                       help="fedmsa trains adapters and the mask decoder; fedsam the whole model")
        p.add_argument("--preset", choices=PRESETS, default="tiny", help="model preset")
        p.add_argument("--epochs", type=int, default=25, help="training epochs (default 25: 5 rounds x 5 local epochs)")
        p.add_argument("--batch-size", type=int, default=32, help="(expected, under DP) batch size of a step")
        p.add_argument("--learning-rate", "--lr", dest="lr", type=float, default=FEDERATED_LEARNING_RATE,
                       help=f"Adam learning rate (default {FEDERATED_LEARNING_RATE:g}, as a federated round)")
        p.add_argument("--epsilon", type=float, help="DP-SGD to this epsilon over the whole run (default: none, no DP)")
        p.add_argument("--delta", type=float, help="default: min(1e-5, 1/(10 n)) for n training patients")
        p.add_argument("--privacy-unit", choices=["patient", "slice"], default="patient",
                       help="DP record: a patient (default; --batch-size is then expected patients per step) "
                            "or a slice (per-slice epsilon; does not protect patients)")
        p.add_argument("--slices-per-patient", type=int, default=1, metavar="M",
                       help="patient-level DP: slices of a sampled patient whose gradients are averaged before "
                            "clipping (default: 1)")
        p.add_argument("--patient-pattern", metavar="REGEX",
                       help="a 2-D file's patient from its name (group 'patient' or the first group; default: dataset.json, else one file each)")
        p.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="DP-SGD clipping bound of one patient's gradient")
        p.add_argument("--seed", type=int, default=0, help="model seed and the sites' split seed (default 0)")
        p.add_argument("--no-pretrained", action="store_true", help="start from the seeded initialisation")
        p.add_argument("--image-size", type=int, help="model input size (default: the preset's)")
        p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
        p.add_argument("--val-fraction", type=float, default=0.25,
                       help="fraction of each site's cases held out for validation")
        add_data_options(p)
        p.add_argument("--out", type=Path, help="write DIR/KIND.json, the model(s) and the sites' splits here "
                       "(default: nowhere)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
        p.set_defaults(handler=cmd_train, kind=kind)
    group.set_defaults(handler=lambda args: _help(group))

    ev = subparsers.add_parser("evaluate", help="score a saved model on a site's validation (or training, or all) "
                                                "slices: Dice, IoU, HD95")
    ev.add_argument("--model", type=Path, required=True, help="STATE/final_model.pt of a site, or OUT/*_model.pt")
    ev.add_argument("--data", type=Path, required=True, help="a site folder (or a folder of site folders)")
    ev.add_argument("--split", choices=SPLITS, default="val",
                    help="which slices: val (default) or train, as the split file pins them (needs --state or "
                         "--split-file), or all (every slice, e.g. of a held-out site)")
    ev.add_argument("--state", type=Path, metavar="DIR",
                    help="the site's state folder: its split.json says which volumes are train and val "
                         "(default: none; --split val|train need it or --split-file)")
    ev.add_argument("--split-file", type=Path, metavar="FILE",
                    help="a split file (a site's STATE/split.json, or OUT/splits/SITE.json of `train --out`; "
                         "default: none)")
    ev.add_argument("--labels", help="label map of these sites (default: the one the model was trained with)")
    ev.add_argument("--axis", type=int, choices=[0, 1, 2], help="default: the model's")
    ev.add_argument("--clip-percentiles", metavar="LOW,HIGH", help="default: the model's")
    ev.add_argument("--keep-empty-every", type=int, metavar="K", help="default: the model's")
    ev.add_argument("--skip-bad", action="store_true",
                    help="skip (and log) corrupt or mismatched pairs instead of stopping")
    ev.add_argument("--cache", type=Path, metavar="DIR",
                    help="keep preprocessed slices in DIR (default: no cache)")
    ev.add_argument("--per-image", action="store_true",
                    help="also list every slice's Dice, IoU and HD95 per class (needs --json)")
    ev.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ev.set_defaults(handler=cmd_evaluate)
    return group


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``train central`` and ``train local``."""
    from fedfms_secure.train.baselines import BaselineOptions, run_local_baselines, train_central

    options = BaselineOptions(
        mode=args.mode, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, epsilon=args.epsilon, delta=args.delta, seed=args.seed,
        pretrained=not args.no_pretrained, holdout=args.holdout, image_size=args.image_size, axis=args.axis,
        keep_empty_every=args.keep_empty_every, labels=args.labels, clip_percentiles=args.clip_percentiles,
        val_fraction=args.val_fraction, skip_bad=args.skip_bad, cache=args.cache,
        max_grad_norm=args.max_grad_norm, privacy_unit=args.privacy_unit, slices_per_patient=args.slices_per_patient,
        patient_pattern=args.patient_pattern, out=args.out, device=args.device,
    )
    run = train_central if args.kind == "central" else run_local_baselines
    result = run(args.data, options, progress=lambda message: print(message, file=sys.stderr))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.kind}.json").write_text(_dumps(result) + "\n")
    if args.json:
        print(_dumps(result))
    else:
        print(_table(result))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``evaluate``."""
    from fedfms_secure.device import resolve_device

    resolve_device(args.device)  # a GPU that is not there: said before anything else
    if args.per_image and not args.json:
        from fedfms_secure.errors import ConfigError

        raise ConfigError("--per-image lists every slice's scores in the JSON output only: add --json")
    split_file = _split_file(args.split, args.state, args.split_file)
    result = evaluate_model_file(args.model, args.data, labels=args.labels, axis=args.axis,
                                 clip_percentiles=args.clip_percentiles, keep_empty_every=args.keep_empty_every,
                                 skip_bad=args.skip_bad, cache=args.cache, per_image=args.per_image,
                                 split=args.split, split_file=split_file, device=args.device)
    if args.json:
        print(_dumps(result))
    else:
        print(_table(result))
    return 0


def _split_file(split: str, state: Path | None, split_file: Path | None) -> Path | None:
    """The split file ``evaluate`` reads, or a ConfigError saying how to name one."""
    from fedfms_secure.errors import ConfigError

    if state is not None and split_file is not None:
        raise ConfigError("pass either --state or --split-file, not both")
    if split == "all":
        return None
    if state is None and split_file is None:
        raise ConfigError(f"--split {split} scores the {split} volumes pinned in a site's split file: pass --state "
                          "STATE (the folder holding split.json) or --split-file FILE (e.g. OUT/splits/SITE.json "
                          "of `train --out`), or --split all to score every slice")
    path = split_file if split_file is not None else state / "split.json"  # type: ignore[operator]
    if not path.is_file():
        hint = "the site writes STATE/split.json when it first loads its data" if split_file is None else \
            "`train central|local --out OUT` writes OUT/splits/SITE.json"
        raise ConfigError(f"split file {path} does not exist ({hint}); check the path, or use --split all")
    return path


def _dumps(result: dict[str, Any]) -> str:
    """Strict JSON: a score that is NaN (no image scored, e.g. a site without validation slices)
    or infinite is written as null, since ``NaN`` is not JSON and other parsers (jq, JavaScript) reject it."""
    return json.dumps(_nan_to_none(result), indent=2, allow_nan=False)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def evaluate_model_file(model_path: Path, data: Path, *, labels: Any = None, axis: int | None = None,
                        clip_percentiles: Any = None, keep_empty_every: int | None = None, skip_bad: bool = False,
                        cache: Path | None = None, per_image: bool = False, split: str = "all",
                        split_file: Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Scores a model file on the ``split`` slices of each site under ``data``: ``"all"`` (every
    slice), or ``"val"`` / ``"train"`` as ``split_file`` (one site's pinned split) says.

    Returns ``{"model", "source", "sites": [{name, slices, dice_mean, dice_std, iou_mean, iou_std,
    hd95_mean, hd95_std, per_class}], "split", "mean": {dice_mean, dice_std, iou_mean, hd95_mean}}``; the
    data options default to those the model was trained with. With ``per_image`` each site also
    lists ``images``: ``{"case", "dice", "iou", "hd95"}`` per slice, one value per class (None
    where the slice is not scored for the class).
    """
    from fedfms_secure.data import find_sites, load_site
    from fedfms_secure.device import resolve_device
    from fedfms_secure.train.metrics import ImageScores, score_model, summarize
    from fedfms_secure.train.model_file import load_model_file

    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if split != "all" and split_file is None:
        raise ConfigError(f"split {split!r} needs the site's split file (STATE/split.json); or use split 'all'")
    target = resolve_device(device)  # an absent GPU fails before the model loads
    model, header = load_model_file(model_path)
    model.to(target)
    recorded = header.data
    options = dict(
        image_size=header.img_size,
        axis=recorded.get("axis", 2) if axis is None else axis,
        clip_percentiles=tuple(recorded.get("clip_percentiles", (0.5, 99.5))) if clip_percentiles is None
        else clip_percentiles,
        keep_empty_every=recorded.get("keep_empty_every", 5) if keep_empty_every is None else keep_empty_every,
        labels=header.label_spec if labels is None else labels,
    )
    rows, parts, names = [], [], None
    sites = find_sites(data)
    if split_file is not None and len(sites) > 1:
        raise ConfigError(f"{data} holds {len(sites)} sites but a split file belongs to one: pass that site's "
                          "folder as --data")
    for site_dir in sites:
        if split_file is None:
            site = load_site(site_dir, val_fraction=0.0, skip_bad=skip_bad, cache_dir=cache, **options)
        else:
            site = load_site(site_dir, split_file=split_file, skip_bad=skip_bad, cache_dir=cache, **options)
        slices = site.val if split == "val" else site.train
        if site.label_map.num_classes != header.num_classes:
            raise ConfigError(f"the label map gives {site.label_map.num_classes} class(es) but {model_path} "
                              f"predicts {header.num_classes}; pass --labels with a map of {header.num_classes}")
        scores = score_model(model, slices)
        parts.append(scores)
        names = names or site.class_names
        summary = summarize(scores, site.class_names)
        rows.append({"name": site.name, "slices": len(slices),
                     **{k: v for k, v in summary.items() if k != "per_class"}, "per_class": summary["per_class"]})
        if per_image:
            rows[-1]["images"] = [
                {"case": case, **{m: [None if math.isnan(v) else float(v) for v in getattr(scores, m)[i]]
                                  for m in ("dice", "iou", "hd95")}}
                for i, case in enumerate(slices.cases)
            ]
    pooled = summarize(ImageScores.concat(parts, header.num_classes), names)
    return {
        "model": str(model_path),
        "source": header.source,
        "split": split,
        "sites": rows,
        "mean": {k: pooled[k] for k in ("dice_mean", "dice_std", "iou_mean", "iou_std", "hd95_mean", "hd95_std")},
    }


def _table(result: dict[str, Any]) -> str:
    lines = [f"{'site':<16} {'Dice':>15} {'IoU':>15} {'HD95 (px)':>15}"]

    def row(name: str, r: dict[str, Any]) -> str:
        return (f"{name:<16} {_pm(r['dice_mean'], r.get('dice_std'))} {_pm(r['iou_mean'], r.get('iou_std'))} "
                f"{_pm(r['hd95_mean'], r.get('hd95_std'), 2)}")

    for site in result["sites"]:
        lines.append(row(site["name"], site))
    lines.append(row("mean (images)", result["mean"]))
    if result.get("holdout"):
        lines.append(row(f"held out: {result['holdout']['name']}", result["holdout"]))
    if result.get("kind"):
        eps = result.get("epsilon")
        unit = result.get("unit") or "patient"
        lines.append(f"{result['kind']}: {result['seconds']:.1f} s, "
                     + ("no DP" if eps is None else f"epsilon spent {eps:.3f} per {unit}"
                        + (" (does NOT protect patients)" if unit == "slice" else "")))
    return "\n".join(lines)


def _pm(mean: float, std: float | None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return f"{'-':>15}"
    text = f"{mean:.{digits}f}" + ("" if std is None or math.isnan(std) else f" ± {std:.{digits}f}")
    return f"{text:>15}"


__all__ = ["cmd_evaluate", "cmd_train", "evaluate_model_file", "register"]
