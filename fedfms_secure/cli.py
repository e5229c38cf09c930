"""``fedfms-secure``: the command line. Each command is a thin layer over the library."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fedfms_secure import __version__
from fedfms_secure.errors import FedFmsError

if TYPE_CHECKING:
    from fedfms_secure.demo import DemoOptions

log = logging.getLogger("fedfms_secure.cli")

# command groups that live in fedfms_secure/commands/<name>.py
COMMAND_GROUPS = ("keys", "status", "model", "privacy", "bench", "data", "train", "predict")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (1 for an error the user can fix, with its message)."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    except BrokenPipeError:
        # the reader went away (`fedfms-secure evaluate --json | head`): no traceback, and no second
        # error when the interpreter flushes stdout at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (an in-memory capture)
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from fedfms_secure.logs import setup_logging

    setup_logging(args.log_level, prefix=getattr(args, "log_prefix", "") or "")
    try:
        return int(args.handler(args) or 0)
    except FedFmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --- commands ----------------------------------------------------------------------------------
def _cmd_server(args: argparse.Namespace) -> int:
    from fedfms_secure.config import ServerConfig, flag_overrides, load_config
    from fedfms_secure.server.daemon import serve
    from fedfms_secure.statelock import PRIVATE_UMASK

    os.umask(PRIVATE_UMASK)  # state.db, ciphertexts and logs: readable by this user only

    return serve(load_config(ServerConfig, args.config, flag_overrides(ServerConfig, args)))


def _cmd_client(args: argparse.Namespace) -> int:
    from fedfms_secure.config import ClientConfig, flag_overrides, load_config
    from fedfms_secure.site.daemon import run_site
    from fedfms_secure.statelock import PRIVATE_UMASK

    os.umask(PRIVATE_UMASK)  # slice caches, split, scores, accountant, final model: this user only

    run_site(load_config(ClientConfig, args.config, flag_overrides(ClientConfig, args)))
    return 0


def demo_options(args: argparse.Namespace) -> DemoOptions:
    """The demo's options from its parsed flags, by field name (checked on construction)."""
    from fedfms_secure.data.preprocess import check_percentiles
    from fedfms_secure.demo import DemoOptions

    values = {f.name: getattr(args, f.name) for f in fields(DemoOptions) if hasattr(args, f.name)}
    return DemoOptions(**{**values, "clip_percentiles": check_percentiles(args.clip_percentiles)})


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedfms_secure.demo import run_demo

    report = run_demo(demo_options(args))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


# --- parser -------------------------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default: appends ``(default: X)`` where the help text does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or action.default in (None, argparse.SUPPRESS)):
            return text
        shown = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose help (and its subcommands' help) shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# what the demo shares with the daemons: the same flags, help and checks, with the demo's defaults
DEMO_SERVER_SETTINGS = ("rounds", "mode", "preset", "image_size", "seed", "local_epochs", "batch_size",
                        "learning_rate", "he", "pretrained")
DEMO_CLIENT_SETTINGS = ("epsilon", "privacy_unit", "accountant", "slices_per_patient", "device", "labels", "axis",
                        "clip_percentiles", "keep_empty_every", "skip_bad")
# the demo's defaults that depend on the preset (DemoOptions resolves them; see demo.DEMO_DATA)
DEMO_SHOWN = {"batch_size": "80 with the tiny preset, 4 with SAM's"}
CONFIG_HELP = "TOML file with the same keys as the flags (underscores: learning_rate = 3e-3); flags override it"


def _parser() -> argparse.ArgumentParser:
    from fedfms_secure.config import ClientConfig, ServerConfig, add_config_options
    from fedfms_secure.demo import DemoOptions

    p = _Parser(prog="fedfms-secure", description=__doc__)
    p.add_argument("--version", action="version", version=f"fedfms-secure {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much the logs say (default: INFO)")
    sub = p.add_subparsers(metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("server", help="run the coordinator (it only ever holds ciphertexts)")
    s.add_argument("--config", type=Path, metavar="FILE", help=f"{CONFIG_HELP} (default: none)")
    add_config_options(s, ServerConfig)
    s.set_defaults(handler=_cmd_server, log_prefix="server")

    c = sub.add_parser("client", help="run one site")
    c.add_argument("--config", type=Path, metavar="FILE", help=f"{CONFIG_HELP} (default: none)")
    add_config_options(c, ClientConfig)
    c.set_defaults(handler=_cmd_client, log_prefix="client")

    m = sub.add_parser("demo", help="a whole secure federation on loopback, with a report")
    demo = {f.name: f.default for f in fields(DemoOptions)}
    m.add_argument("--out", type=Path, default=demo["out"], metavar="DIR",
                   help="folder of the data, the run, the logs and the report (default: %(default)s)")
    m.add_argument("--clients", type=int, default=demo["clients"],
                   help="sites that train, one process each (default: %(default)s)")
    add_config_options(m, ServerConfig, names=DEMO_SERVER_SETTINGS, defaults=demo, shown=DEMO_SHOWN)
    add_config_options(m, ClientConfig, names=DEMO_CLIENT_SETTINGS, defaults=demo)
    m.add_argument("--data", type=Path, metavar="DIR",
                   help="existing site folders instead of generated ones (default: synthetic sites in OUT/data)")
    m.add_argument("--holdout", metavar="SITE",
                   help="leave-one-site-out: SITE never trains; the final model is scored on it at the end "
                        "(default: none)")
    m.add_argument("--json", action="store_true", help="also print report.json (default: off)")
    m.set_defaults(handler=_cmd_demo)

    for group in COMMAND_GROUPS:
        importlib.import_module(f"fedfms_secure.commands.{group}").register(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
