"""``fedfms-secure data ...``: write a synthetic or a real-anatomy federation, inspect a data folder.

``add_data_options(parser)`` adds the flags that say how site folders are read (label map, axis,
clip percentiles, empty-slice keeping, bad files, slice cache), generated from the site's config
fields as ``client`` and ``demo`` are, so a site and a baseline read the same data the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

# kept light: torch, monai and nibabel are imported inside the handlers

# the data settings of a site (fedfms_secure.config.ClientConfig), with the same flags and help
DATA_SETTINGS = ("labels", "axis", "clip_percentiles", "keep_empty_every", "skip_bad")


def add_data_options(parser: argparse.ArgumentParser, *, cache: bool = True) -> None:
    """The flags that say how a site folder is read, generated from :class:`ClientConfig`'s fields
    (so a baseline and a site take the same flags, with the same defaults)."""
    from fedfms_secure.config import ClientConfig, add_config_options, setting_help

    add_config_options(parser, ClientConfig, names=DATA_SETTINGS,
                       defaults={f.name: f.default for f in dataclasses.fields(ClientConfig)})
    if cache:
        parser.add_argument("--cache", type=Path, metavar="DIR",
                            help=f"{setting_help(ClientConfig, 'cache')} (default: no cache)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``data`` command group (``data synth``, ``data anatomy``, ``data inspect``) to an argparse ``subparsers``."""
    group = subparsers.add_parser("data", help="site datasets")
    sub = group.add_subparsers(metavar="ACTION")
    synth = sub.add_parser("synth", help="write a synthetic multi-site NIfTI federation (MSD layout)")
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the site folders into")
    synth.add_argument("--sites", type=int, default=3, help="number of site folders, named site_1 .. site_K")
    synth.add_argument("--names", metavar="A,B,...",
                       help="name the site folders instead (e.g. hosp_a,hosp_b, the names of `keys init --clients`); "
                            "their number replaces --sites (default: site_1 .. site_K)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the generated volumes")
    synth.set_defaults(handler=cmd_synth)
    anatomy = sub.add_parser("anatomy", help="write a multi-site NIfTI federation (MSD layout) from the real MRI "
                                             "template shipped with nilearn: deformed patients, scanner-like sites")
    anatomy.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the site folders into")
    anatomy.add_argument("--sites", type=int, default=3, help="number of site folders (default 3)")
    anatomy.add_argument("--cases", type=int, default=3, help="patients (volumes) per site (default 3)")
    anatomy.add_argument("--classes", default="wm", help="tissue classes, label k = k-th: wm, gm or wm,gm (default wm)")
    anatomy.add_argument("--size", type=int, default=64, help="in-plane size in pixels (default 64)")
    anatomy.add_argument("--slices", type=int, default=20, help="axial slices per volume (default 20)")
    anatomy.add_argument("--seed", type=int, default=0, help="seed of the deformations and scanners (default 0)")
    anatomy.set_defaults(handler=cmd_anatomy)
    inspect = sub.add_parser("inspect", help="sites, volumes, slices, shapes, labels and problems of a data folder")
    inspect.add_argument("data", type=Path, help="a site folder or a folder of site folders")
    inspect.add_argument("--image-size", type=int, default=64, help="the model's input size (default 64)")
    inspect.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    add_data_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(handler=cmd_inspect)
    group.set_defaults(handler=lambda args: _help(group))
    return group


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_synth(args: argparse.Namespace) -> int:
    """Handler of ``data synth``."""
    from fedfms_secure.data import synth_federation

    names = args.names.split(",") if args.names is not None else None
    for site in synth_federation(args.out, sites=args.sites, seed=args.seed, names=names):
        print(site)
    return 0


def cmd_anatomy(args: argparse.Namespace) -> int:
    """Handler of ``data anatomy``."""
    from fedfms_secure.data.anatomy import anatomy_federation

    for site in anatomy_federation(args.out, sites=args.sites, cases=args.cases, seed=args.seed, size=args.size,
                                   slices=args.slices, classes=args.classes):
        print(site)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Handler of ``data inspect``: exits 1 when a site folder cannot be trained on."""
    from fedfms_secure.data.inspect import inspect_federation

    report = inspect_federation(args.data, image_size=args.image_size, axis=args.axis, seed=args.seed,
                                keep_empty_every=args.keep_empty_every, labels=args.labels,
                                clip_percentiles=args.clip_percentiles, cache_dir=args.cache)
    if args.json:
        print(json.dumps(report, indent=2))
        return _trainable(report)
    for site in report["sites"]:
        shapes = ", ".join(f"{shape} ({n})" for shape, n in site["image_shapes"].items()) or "-"
        classes = ", ".join(f"{name} {100 * f:.2f}%" for name, f in site["class_fractions"].items())
        print(f"{site['name']}: {site['volumes']} volumes, {site['train_slices']} training and "
              f"{site['val_slices']} validation slices; shapes {shapes}; label values "
              f"{_values(site['label_values'])}; foreground {100 * site['foreground_fraction']:.2f}%"
              + (f" ({classes})" if len(site["class_fractions"]) > 1 else ""))
        for problem in site["problems"]:
            print(f"  problem: {problem['file']}: {problem['problem']}")
    return _trainable(report)


def _trainable(report: dict[str, Any]) -> int:
    """0 when every site can be trained on; else 1, naming on stderr each site that cannot."""
    code = 0
    for site in report["sites"]:
        if site["train_slices"] == 0:
            why = "no training slice"
        elif site["foreground_fraction"] == 0:
            why = "no foreground in any label"
        else:
            continue
        print(f"error: site {site['name']} cannot be trained on ({why}): fix the problems listed for "
              f"{site['path']}, or leave the folder out", file=sys.stderr)
        code = 1
    return code


def _values(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


__all__ = ["DATA_SETTINGS", "add_data_options", "cmd_anatomy", "cmd_inspect", "cmd_synth", "register"]
