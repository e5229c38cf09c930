"""``fedfms-secure``: the command line. Each command is a thin layer over the library."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from fedfms_secure import __version__
from fedfms_secure.commands.data import add_data_options
from fedfms_secure.errors import FedFmsError

log = logging.getLogger("fedfms_secure.cli")

# command groups that live in fedfms_secure/commands/<name>.py
COMMAND_GROUPS = ("keys", "status", "model", "privacy", "bench", "data", "train")


def main(argv: Sequence[str] | None = None) -> int:
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
    from fedfms_secure.config import ServerConfig, load_config
    from fedfms_secure.server.daemon import serve

    config = load_config(
        ServerConfig,
        args.config,
        {
            "keys": args.keys,
            "state": args.state,
            "address": args.address,
            "insecure": True if args.insecure else None,
            "rounds": args.rounds,
            "mode": args.mode,
            "preset": args.preset,
            "seed": args.seed,
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "he": False if args.no_he else None,
            "pretrained": False if args.no_pretrained else None,
            "num_classes": args.num_classes,
            "exit_when_done": True if args.exit_when_done else None,
            "round_deadline": args.round_deadline,
            "min_sites": args.min_sites,
            "passphrase_file": args.passphrase_file,
        },
    )
    return serve(config)


def _cmd_client(args: argparse.Namespace) -> int:
    from fedfms_secure.site.daemon import run_site
    from fedfms_secure.config import ClientConfig, load_config

    config = load_config(
        ClientConfig,
        args.config,
        {
            "keys": args.keys,
            "data": args.data,
            "state": args.state,
            "server": args.server,
            "insecure": True if args.insecure else None,
            "site": args.site,
            "epsilon": args.epsilon,
            "delta": args.delta,
            "max_grad_norm": args.max_grad_norm,
            "accountant": args.accountant,
            "privacy_unit": args.privacy_unit,
            "patient_pattern": args.patient_pattern,
            "save_updates": True if args.save_updates else None,
            "connect_timeout": args.connect_timeout,
            "labels": args.labels,
            "axis": args.axis,
            "clip_percentiles": args.clip_percentiles,
            "keep_empty_every": args.keep_empty_every,
            "skip_bad": True if args.skip_bad else None,
            "cache": args.cache,
            "passphrase_file": args.passphrase_file,
        },
    )
    run_site(config)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedfms_secure.data.preprocess import check_percentiles
    from fedfms_secure.demo import DemoOptions, run_demo

    options = DemoOptions(
        out=args.out,
        clients=args.clients,
        rounds=args.rounds,
        epsilon=args.epsilon,
        he=not args.no_he,
        mode=args.mode,
        data=args.data,
        preset=args.preset,
        seed=args.seed,
        local_epochs=args.local_epochs,
        learning_rate=args.lr,
        pretrained=not args.no_pretrained,
        holdout=args.holdout,
        labels=args.labels,
        axis=args.axis,
        clip_percentiles=check_percentiles(args.clip_percentiles),
        keep_empty_every=args.keep_empty_every,
        skip_bad=args.skip_bad,
        privacy_unit=args.privacy_unit,
    )
    report = run_demo(options)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


# --- parser -------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfms-secure", description=__doc__)
    p.add_argument("--version", action="version", version=f"fedfms-secure {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(metavar="COMMAND")

    s = sub.add_parser("server", help="run the coordinator (it only ever holds ciphertexts)")
    s.add_argument("--config", type=Path, help="TOML file with the same keys as the flags")
    s.add_argument("--keys", type=Path, help="server bundle from `keys export server`")
    s.add_argument("--address", help="HOST:PORT to listen on (port 0 picks a free one; default 127.0.0.1:50051)")
    s.add_argument("--state", type=Path, help="folder for the server's state")
    s.add_argument("--rounds", type=int)
    s.add_argument("--mode", choices=["fedmsa", "fedsam"])
    s.add_argument("--preset", help="model preset (default tiny)")
    s.add_argument("--seed", type=int)
    s.add_argument("--local-epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--no-he", action="store_true", help="sum plaintext updates (a baseline, not private)")
    s.add_argument("--no-pretrained", action="store_true",
                   help="start from the seeded initialisation instead of the preset's pretrained weights")
    s.add_argument("--num-classes", type=int,
                   help="foreground classes of the model (default 1): every site's --labels must map to this many")
    s.add_argument("--insecure", action="store_true", help="serve without TLS (local experiments only)")
    s.add_argument("--exit-when-done", action="store_true", help="exit once every round is done")
    s.add_argument("--round-deadline", type=float,
                   help="seconds a phase waits before going on with --min-sites sites (default: wait for all)")
    s.add_argument("--min-sites", type=int, help="quorum at the deadline (default 1)")
    s.add_argument("--passphrase-file", type=Path, help="file with the passphrase of the bundle's encrypted keys")
    s.set_defaults(handler=_cmd_server, log_prefix="server")

    c = sub.add_parser("client", help="run one site")
    c.add_argument("--config", type=Path, help="TOML file with the same keys as the flags")
    c.add_argument("--keys", type=Path, help="client bundle from `keys export client NAME`")
    c.add_argument("--server", help="the coordinator's HOST:PORT")
    c.add_argument("--data", type=Path, help="the site's folder (imagesTr/, labelsTr/)")
    c.add_argument("--state", type=Path, help="folder for the site's state (privacy ledger, split)")
    c.add_argument("--epsilon", type=float, help="target epsilon over the whole run (inf: no DP)")
    c.add_argument("--delta", type=float, help="default: min(1e-5, 1/(10 n)) for n training patients")
    c.add_argument("--max-grad-norm", type=float)
    c.add_argument("--accountant", choices=["rdp", "prv"], help="privacy accountant (default rdp)")
    c.add_argument("--privacy-unit", choices=["patient", "slice"],
                   help="DP record: a patient (default) or a slice (per-slice epsilon; does not protect patients)")
    c.add_argument("--patient-pattern", metavar="REGEX",
                   help="a 2-D file's patient from its name (group 'patient' or the first group), e.g. '^(\\w+?)_'")
    c.add_argument("--site", help="site name, only with --insecure")
    c.add_argument("--insecure", action="store_true", help="connect without TLS (local experiments only)")
    c.add_argument("--save-updates", action="store_true", help="keep each round's delta and aggregate in STATE/updates")
    c.add_argument("--connect-timeout", type=float)
    add_data_options(c, defaults=False)
    c.add_argument("--passphrase-file", type=Path, help="file with the passphrase of the bundle's encrypted keys")
    c.set_defaults(handler=_cmd_client, log_prefix="client")

    m = sub.add_parser("demo", help="a whole secure federation on loopback, with a report")
    m.add_argument("--out", type=Path, default=Path("demo-out"))
    m.add_argument("--clients", type=int, default=3)
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--epsilon", type=float, default=8.0, help="each site's target epsilon (inf: no DP)")
    m.add_argument("--privacy-unit", choices=["patient", "slice"], default="patient",
                   help="DP record: a patient (default) or a slice (per-slice epsilon; does not protect patients)")
    m.add_argument("--no-he", action="store_true", help="sum plaintext updates instead of CKKS ciphertexts")
    m.add_argument("--mode", choices=["fedmsa", "fedsam"], default="fedmsa")
    m.add_argument("--data", type=Path, help="existing site folders instead of generated ones")
    m.add_argument("--preset", default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--local-epochs", type=int, default=5)
    m.add_argument("--lr", type=float, help="the sites' Adam learning rate (default: the server's plan)")
    m.add_argument("--no-pretrained", action="store_true", help="a random encoder instead of the pretrained preset")
    m.add_argument("--holdout", metavar="SITE",
                   help="leave-one-site-out: SITE never trains; the final model is scored on it at the end")
    add_data_options(m, cache=False)
    m.add_argument("--json", action="store_true", help="also print report.json")
    m.set_defaults(handler=_cmd_demo)

    for group in COMMAND_GROUPS:
        importlib.import_module(f"fedfms_secure.commands.{group}").register(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
