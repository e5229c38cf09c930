"""``fedfms-secure status``: where a federation stands, asked of its server over mutual TLS."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from fedfms_secure.protocol import KeyEpoch, Status


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``status`` command to the CLI."""
    p = sub.add_parser("status", help="the round, the sites and the deadline, from a running server")
    p.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    p.add_argument("--keys", type=Path, required=True, help="a client bundle of the federation")
    p.add_argument("--passphrase-file", type=Path,
                   help="file whose first line is the passphrase: opens a bundle whose keys are encrypted at rest "
                        "(default: none)")
    p.add_argument("--insecure", action="store_true", help="the server runs with --insecure")
    p.add_argument("--site", help="site name, only with --insecure (default: none)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from fedfms_secure.keys.bundle import load_bundle
    from fedfms_secure.keys.pki import read_passphrase
    from fedfms_secure.transport.client import FederationClient

    if args.insecure:
        client = FederationClient(args.server, insecure=True, site=args.site, call_timeout=args.timeout)
    else:
        b = load_bundle(args.keys, role="client", passphrase=read_passphrase(args.passphrase_file))
        client = FederationClient.from_bundle(b, args.server, call_timeout=args.timeout)
    with client:
        client.wait_ready(args.timeout, flag="--timeout")
        status = client.status()
    if args.json:
        print(json.dumps({**asdict(status), "done": status.done}))
        return 0
    now = time.time()
    print(headline(status))
    print(_key_line(status.key))
    if status.deadline:
        print(f"deadline: in {max(0.0, status.deadline - now):.0f} s the phase goes on with the sites it has")
    print(f"{'site':<20} {'last seen':>10}  committed  uploaded  retired")
    for s in status.sites:
        seen = f"{now - s.last_seen:.0f} s ago" if s.last_seen else "never"
        retired = f"yes: {s.retired_reason}" if s.retired else "no"
        print(f"{s.name:<20} {seen:>10}  {'yes' if s.committed else 'no':>9}  {'yes' if s.uploaded else 'no':>8}  {retired}")
    return 0


def headline(status: Status) -> str:
    """Where the federation is, with rounds counted 1..R as everywhere users read them."""
    if status.done:
        return f"federation {status.federation}: finished, all {status.total_rounds} rounds done"
    return f"federation {status.federation}: round {status.round + 1} of {status.total_rounds}, phase {status.phase}"


def _key_line(key: KeyEpoch) -> str:
    """The CKKS key epoch in use, in words (epoch 0: no key yet, or a federation without HE)."""
    if key.epoch == 0:
        return "CKKS key: none (no `keys he-init` yet, or the federation runs without HE)"
    made = f"made at site {key.site}" if key.site else "made by the provisioning host"
    return f"CKKS key: epoch {key.epoch}, fingerprint {key.fingerprint[:16]}, from round {key.round + 1}, {made}"
