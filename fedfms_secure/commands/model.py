"""``fedfms-secure model ...``: the model command group.

``fedfms-secure model summary --preset vit_b --mode fedmsa --json`` prints what a mode trains and
sends per round. Wire it into the CLI with :func:`register` (``register(subparsers)``).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

# kept light: torch and segment_anything are imported inside the handler


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``model`` command group (``model summary``) to an argparse ``subparsers``.

    Importing this module and registering is cheap (no torch); unknown presets, modes or
    prompts raise :class:`~fedfms_secure.errors.ModelError` (listing the known ones) when run.
    """
    group = subparsers.add_parser("model", help="SAM presets and what each mode trains and sends")
    sub = group.add_subparsers(dest="model_command", metavar="COMMAND")
    summary = sub.add_parser(
        "summary",
        help="parameter counts of a preset in a mode (total, trainable, communicated, adapter)",
    )
    summary.add_argument("--preset", default="tiny", help="tiny, vit_b, vit_l or vit_h")
    summary.add_argument("--mode", default="fedmsa", help="fedmsa or fedsam")
    summary.add_argument("--num-classes", type=int, default=1,
                         help="foreground classes (one SAM mask token each, 1-4)")  # fmt: skip
    summary.add_argument("--prompt", default="none", help="none (prompt-free) or box")
    summary.add_argument("--adapter-ratio", type=float, default=0.25,
                         help="width of a Medical SAM Adapter as a fraction of the embedding")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.set_defaults(handler=cmd_summary)
    group.set_defaults(handler=lambda args: _help(group))
    return group


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def summarize(
    preset: str, mode: str, *, num_classes: int = 1, prompt: str = "none",
    adapter_ratio: float = 0.25,
) -> dict[str, int]:  # fmt: skip
    """``{"total", "trainable", "communicated", "adapter", "bytes_fp32"}`` of ``preset`` in ``mode``.

    Counted on the meta device: shapes only, no memory and no initialisation cost, so vit_h is
    as fast as tiny. Counts do not depend on weights.
    """
    import torch

    from fedfms_secure.model.modes import _check_mode, mode_summary
    from fedfms_secure.model.registry import build_model

    _check_mode(mode)  # before building anything
    logger = logging.getLogger("fedfms_secure.model")
    level = logger.level
    logger.setLevel(logging.ERROR)  # no "random initialisation" warning: nothing is initialised
    try:
        with torch.device("meta"):
            model = build_model(preset, pretrained=False, num_classes=num_classes, prompt=prompt,
                                adapter_ratio=adapter_ratio)  # fmt: skip
    finally:
        logger.setLevel(level)
    return mode_summary(model, mode)


def cmd_summary(args: argparse.Namespace) -> int:
    """Handler of ``model summary``."""
    counts = summarize(args.preset, args.mode, num_classes=args.num_classes, prompt=args.prompt,
                       adapter_ratio=args.adapter_ratio)  # fmt: skip
    if args.json:
        print(json.dumps(counts))
        return 0
    print(f"preset {args.preset}, mode {args.mode}, {args.num_classes} class(es), prompt {args.prompt}")
    for key, value in counts.items():
        shown = f"{value / 2**20:,.2f} MiB" if key == "bytes_fp32" else f"{value:,}"
        print(f"  {key:<13} {shown}")
    return 0


__all__ = ["cmd_summary", "register", "summarize"]
