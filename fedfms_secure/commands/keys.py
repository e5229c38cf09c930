"""``fedfms-secure keys``: provision the federation, change its keys, and check them.

``init`` makes a provisioning folder (the CA and every certificate; no CKKS secret key: one site
makes it with ``keys he-init``), ``envelope-key`` makes a site's envelope key at the site (only its
public key goes to ``init`` / ``add-client``), ``export`` writes the bundle one party needs, ``add-client``,
``revoke`` and ``rotate-tls`` change the federation afterwards, ``show`` lists who holds which
key, ``verify`` checks a bundle. ``he-init`` and ``rotate-he`` (the CKKS key, at a site) come
from ``commands/keys_he.py``. The library behind them: ``keys/provision.py``,
``keys/lifecycle.py``, ``keys/export.py`` and ``keys/keycheck.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from fedfms_secure.errors import ConfigError
from fedfms_secure.he.packing import DEFAULT_UPDATE_BOUND
from fedfms_secure.he.quantplan import DEFAULT_ERROR_RATIO


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``keys`` command group to the CLI."""
    k = sub.add_parser("keys", help="provision the federation's certificates and keys, change and check them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ksub = k.add_subparsers(metavar="ACTION")

    ki = ksub.add_parser("init", help="make a CA, server and site certificates and envelope keys",
                         description="Create a provisioning folder. No CKKS secret key is made here: one site makes it "
                                     "with `keys he-init` and seals it to the others.")
    ki.add_argument("--out", type=Path, required=True, help="the provisioning folder to create (must be empty)")
    ki.add_argument("--federation", default="fedfms", help="the federation's name (default fedfms)")
    ki.add_argument("--server-host", required=True, help="the host name or IP the sites connect to")
    ki.add_argument("--clients", required=True, help="comma-separated site names")
    ki.add_argument("--algorithm", choices=["ecdsa-p256", "ed25519"], default="ecdsa-p256",
                    help="TLS key algorithm of the server and sites (default ecdsa-p256; gRPC refuses ed25519)")
    ki.add_argument("--ca-algorithm", choices=["ecdsa-p256", "ed25519"],
                    help="the CA's key algorithm (default: --algorithm); ed25519 works for the CA")
    ki.add_argument("--days", type=int, default=365, help="lifetime of server and site certificates (default 365)")
    ki.add_argument("--ca-days", type=int, default=3650, help="lifetime of the CA certificate (default 3650)")
    _passphrase_arg(ki, "encrypt every private key written with the passphrase in this file")
    ki.add_argument("--update-bound", type=float,
                    help="largest |value| of a weighted update; larger values are clipped (default: "
                         f"--lr x --local-steps with a plan, else {DEFAULT_UPDATE_BOUND})")
    ki.add_argument("--lr", type=float, help="the plan's Adam learning rate: with --local-steps it sizes the CKKS "
                                             "quantisation to the DP noise (bound lr x steps, noise lr x sqrt(steps))")
    ki.add_argument("--local-steps", type=int, help="the plan's optimizer steps per round at the busiest site "
                                                    "(local epochs x steps per epoch)")
    ki.add_argument("--noise-std", type=float, help="per-coordinate DP noise std of one site's weighted update "
                                                    "(default with a plan: lr x sqrt(steps) / sites)")
    ki.add_argument("--max-error-ratio", type=float, default=DEFAULT_ERROR_RATIO,
                    help="quantisation error std at most this fraction of --noise-std (default %(default)s)")
    ki.add_argument("--no-dp", action="store_true",
                    help="the plan trains without DP: the error std is at most 1e-3 of the bound instead")
    ki.add_argument("--max-rounds", type=int, default=10, help="rounds this CKKS key may sum (default 10)")
    ki.add_argument("--max-sites", type=int,
                    help="sites the CKKS packing makes room for, to add some later with `keys add-client` "
                         "(default: the number of --clients)")
    ki.add_argument("--quant-bits", type=int, help="quantisation step = bound / 2**bits (default: sized to the "
                                                    "plan's noise with --lr and --local-steps or --noise-std, else "
                                                    "the finest that fits 8 B per parameter)")
    ki.add_argument("--legacy-ckks", action="store_true",
                    help="one value per CKKS slot (57 B per parameter) instead of packed integers")
    ki.add_argument("--envelope-public", action="append", default=[], metavar="NAME=FILE",
                    help="a site's envelope public key (the .pub of `keys envelope-key` run at that site): its "
                         "private key never comes here (repeat per site)")
    ki.add_argument("--json", action="store_true", help="print what was made as JSON")
    ki.set_defaults(handler=_init)

    kn = ksub.add_parser("envelope-key", help="at a site: make its X25519 envelope key; only the .pub goes to "
                                              "the provisioning host",
                         description="Run at the site before provisioning. Give OUT.pub to the provisioning host "
                                     "(`keys init --envelope-public NAME=OUT.pub` or `keys add-client NAME "
                                     "--envelope-public OUT.pub`), then copy OUT into the site's bundle as "
                                     "envelope.key. The provisioning host then cannot open the CKKS key sealed "
                                     "to this site.")
    kn.add_argument("--out", type=Path, required=True, help="the private key file to write (0600); OUT.pub too")
    _passphrase_arg(kn, "encrypt the key with the passphrase in this file; it must be the one the site's "
                        "bundle and daemons use (one passphrase opens every key of a bundle)")
    kn.add_argument("--json", action="store_true")
    kn.set_defaults(handler=_envelope_key)

    ke = ksub.add_parser("export", help="write the bundle one party needs, and nothing more")
    ke.add_argument("role", choices=["server", "client"])
    ke.add_argument("name", nargs="?", help="site name (for a client bundle)")
    _from_arg(ke)
    ke.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    ke.add_argument("--update", action="store_true",
                    help="rewrite an earlier bundle of the same party in place (keeps files a site added, e.g. he/)")
    ke.add_argument("--json", action="store_true")
    ke.set_defaults(handler=_export)

    ka = ksub.add_parser("add-client", help="issue a certificate and an envelope key for a new site",
                         description="Then re-export the server bundle and restart the server; the new site gets "
                                     "the CKKS key at the next `keys rotate-he`.")
    ka.add_argument("name", help="the new site's name")
    _from_arg(ka)
    ka.add_argument("--days", type=int, help="certificate lifetime (default: the federation's)")
    _passphrase_arg(ka, "opens the CA key and encrypts the new keys")
    ka.add_argument("--out-bundle", type=Path, help="also export the new site's bundle here")
    ka.add_argument("--envelope-public", type=Path, metavar="FILE",
                    help="the site's envelope public key (the .pub of `keys envelope-key` run there)")
    ka.add_argument("--json", action="store_true")
    ka.set_defaults(handler=_add_client)

    kr = ksub.add_parser("revoke", help="revoke a site's certificate: the server refuses it from the next call on",
                         description="Writes the CA-signed revocation list DIR/ca/crl.pem; a server whose bundle "
                                     "holds it (see --server-bundle) refuses the site, naming the reason, and no "
                                     "longer waits for it in rounds.")
    kr.add_argument("name", help="the site to revoke")
    _from_arg(kr)
    kr.add_argument("--reason", choices=["key-compromise", "superseded", "cessation-of-operation"],
                    default="key-compromise", help="recorded in the CRL and told to the site (default key-compromise)")
    kr.add_argument("--server-bundle", type=Path, help="copy the new crl.pem into this server bundle (a running "
                                                       "server picks it up)")
    _passphrase_arg(kr, "opens the CA key")
    kr.add_argument("--json", action="store_true")
    kr.set_defaults(handler=_revoke)

    kt = ksub.add_parser("rotate-tls", help="new TLS keys and certificates; the old ones are revoked as superseded")
    kt.add_argument("names", nargs="*", metavar="NAME", help="the sites to rotate")
    kt.add_argument("--all", action="store_true", help="every active site and the server")
    _from_arg(kt)
    kt.add_argument("--days", type=int, help="certificate lifetime (default: the federation's)")
    _passphrase_arg(kt, "opens the CA key and encrypts the new keys")
    kt.add_argument("--out-bundles", type=Path,
                    help="export the rotated parties' bundles to OUT_BUNDLES/<party> (an existing bundle of the same "
                         "party there is updated in place)")
    kt.add_argument("--server-bundle", type=Path, help="copy the new crl.pem into this server bundle")
    kt.add_argument("--json", action="store_true")
    kt.set_defaults(handler=_rotate_tls)

    ks = ksub.add_parser("show", help="fingerprints, serials, expiry dates, revocations, and who holds which key")
    _from_arg(ks)
    ks.add_argument("--json", action="store_true")
    ks.set_defaults(handler=_show)

    kv = ksub.add_parser("verify", help="check a bundle: chain, expiry, keys, file modes, checksums, no server secret",
                         description="Exits 1 with the list of problems (each naming the file and the fix) when any "
                                     "check fails.")
    kv.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    _passphrase_arg(kv, "to check encrypted private keys against their certificates")
    kv.add_argument("--json", action="store_true")
    kv.set_defaults(handler=_verify)

    importlib.import_module("fedfms_secure.commands.keys_he").register(ksub)


def _from_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", type=Path, required=True, metavar="DIR",
                   help="the provisioning folder (from `keys init`)")


def _passphrase_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--passphrase-file", type=Path, help=f"file whose first line is the passphrase: {what}")


def _passphrase(args: argparse.Namespace) -> bytes | None:
    from fedfms_secure.keys.pki import read_passphrase

    return read_passphrase(args.passphrase_file)


def _emit(args: argparse.Namespace, doc: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for line in lines:
            print(line)


# --- handlers ------------------------------------------------------------------------------------
def _init(args: argparse.Namespace) -> int:
    from fedfms_secure.he.ckks import CkksParams
    from fedfms_secure.keys.federation import check_algorithms
    from fedfms_secure.keys.provision import init_federation
    from fedfms_secure.he.packing import estimate_bytes_per_param, fit_params
    from fedfms_secure.he.quantplan import UpdatePlan, plan_params

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    check_algorithms(args.algorithm, args.ca_algorithm or args.algorithm)  # before any slow work
    passphrase = _passphrase(args)
    if args.legacy_ckks:
        params = CkksParams()
    else:
        if args.max_sites is not None and args.max_sites < len(clients):
            raise ConfigError(f"--max-sites {args.max_sites} is less than the {len(clients)} sites of --clients: "
                              "raise it or leave it out")
        sites = max(1, len(clients), args.max_sites or 0)
        planned = args.lr is not None or args.local_steps is not None or args.noise_std is not None
        if planned:
            plan = UpdatePlan(lr=args.lr, local_steps=args.local_steps, sites=sites, rounds=args.max_rounds,
                              dp=not args.no_dp, bound=args.update_bound, noise_std=args.noise_std,
                              error_ratio=args.max_error_ratio)
            params = (plan_params(plan) if args.quant_bits is None  # else the plan's bound, the bits given
                      else fit_params(bound=plan.update_bound, sites=sites, rounds=args.max_rounds,
                                      quant_bits=args.quant_bits))
        else:
            bound = DEFAULT_UPDATE_BOUND if args.update_bound is None else args.update_bound
            params = fit_params(bound=bound, sites=sites, rounds=args.max_rounds, quant_bits=args.quant_bits)
    out = init_federation(
        args.out, federation=args.federation, server_host=args.server_host, clients=clients, days=args.days,
        ca_days=args.ca_days, params=params, algorithm=args.algorithm, ca_algorithm=args.ca_algorithm,
        passphrase=passphrase, he_dealer=False, envelope_publics=_envelope_publics(args.envelope_public),
    )
    lines = [f"provisioned federation {args.federation!r} with {len(clients)} site(s) in {out}"
             + (" (private keys encrypted with the passphrase)" if passphrase else "")]
    if params.packing is not None:
        pk = params.packing
        per_param = estimate_bytes_per_param(params.poly_modulus_degree, params.coeff_mod_bit_sizes[0], pk.lanes,
                                             seeded=True)
        lines.append(f"CKKS: {pk.quant_bits}-bit values within +-{pk.bound:g}, {pk.lanes} per coefficient, for up to "
                     f"{pk.rounds} rounds; about {per_param:.2f} B per parameter up"
                     + (f"; step {pk.step:.3g} for a DP noise std of {pk.noise_std:.3g}" if pk.noise_std else ""))
        spare = pk.sites - len(clients)
        lines.append(f"room for {pk.sites} site(s) in all (--max-sites): "
                     + (f"`keys add-client` can add {spare} more" if spare > 0 else
                        "`keys add-client` cannot add any; to leave room, run `keys init` with --max-sites N"))
    lines += [
        "no CKKS secret key was made here: one site makes it with `fedfms-secure keys he-init`",
        f"next: fedfms-secure keys export server --from {out} --out SERVER_BUNDLE",
        f"      fedfms-secure keys export client NAME --from {out} --out SITE_BUNDLE   (for each site)",
    ]
    _emit(args, {"folder": str(out), "federation": args.federation, "clients": clients,
                 "algorithm": args.algorithm, "ca_algorithm": args.ca_algorithm or args.algorithm,
                 "days": args.days, "ca_days": args.ca_days, "encrypted": bool(passphrase),
                 "ckks": {"params": params.to_dict(), "source": "site"}}, lines)
    return 0


def _envelope_key(args: argparse.Namespace) -> int:
    from fedfms_secure.atomic import write_atomic
    from fedfms_secure.keys import pki

    out: Path = args.out
    pub = out.with_name(out.name + ".pub")
    for path in (out, pub):
        if path.exists():
            raise ConfigError(f"{path} exists: an envelope key is never overwritten here (a bundle may rely on "
                              "it); give another --out")
    if not out.parent.is_dir():
        raise ConfigError(f"folder {out.parent} does not exist; create it first")
    key = pki.new_envelope_key()
    public = pki.raw_public(key).hex()
    pki.write_private(out, pki.pem_private_key(key, _passphrase(args)))
    write_atomic(pub, (public + "\n").encode())
    _emit(args, {"key": str(out), "public": str(pub), "public_key": public}, [
        f"wrote the envelope key {out} (0600) and its public key {pub}: {public}",
        f"next: give {pub.name} to the provisioning host (keys init --envelope-public NAME={pub.name}), keep {out.name} "
        f"here and copy it into this site's bundle as envelope.key once the bundle arrives",
    ])
    return 0


def _read_public(path: Path) -> bytes:
    """The raw X25519 public key in a .pub file of `keys envelope-key`."""
    from fedfms_secure.keys.federation import check_envelope_public

    try:
        text = Path(path).read_text().strip()
        return check_envelope_public(bytes.fromhex(text), what=str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: make it at the site with `fedfms-secure keys envelope-key`") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"{path} is not a .pub file of `fedfms-secure keys envelope-key` (64 hex digits): make it "
                          "again at the site") from None


def _envelope_publics(items: list[str]) -> dict[str, bytes]:
    publics: dict[str, bytes] = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise ConfigError(f"--envelope-public {item!r}: write NAME=FILE, e.g. --envelope-public site-a=site-a.pub")
        if name.strip() in publics:
            raise ConfigError(f"--envelope-public gives {name.strip()!r} twice: give each site's key once")
        publics[name.strip()] = _read_public(Path(file.strip()))
    return publics


def _export(args: argparse.Namespace) -> int:
    from fedfms_secure.keys.export import export_bundle

    if args.role == "client" and not args.name:
        raise ConfigError("keys export client needs the site NAME: fedfms-secure keys export client NAME --from DIR --out DIR")
    if args.role == "server" and args.name:
        raise ConfigError(f"keys export server takes no NAME (got {args.name!r}): fedfms-secure keys export server "
                          "--from DIR --out DIR")
    out = export_bundle(args.role, args.name, args.source, args.out, update=args.update)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    _emit(args, {"bundle": str(out), "role": args.role, "name": args.name or "server", "files": files},
          [f"wrote {args.role} bundle{' for ' + args.name if args.name else ''} to {out}: {', '.join(files)}"])
    return 0


def _add_client(args: argparse.Namespace) -> int:
    from fedfms_secure.keys.export import export_bundle
    from fedfms_secure.keys.provision import add_client

    public = _read_public(args.envelope_public) if args.envelope_public else None
    folder = add_client(args.source, args.name, passphrase=_passphrase(args), days=args.days, envelope_public=public)
    bundle = export_bundle("client", args.name, args.source, args.out_bundle) if args.out_bundle else None
    lines = [f"added site {args.name!r}: {folder}"]
    if bundle:
        lines.append(f"wrote its bundle to {bundle}")
    lines += [
        f"next: fedfms-secure keys export server --from {args.source} --out SERVER_BUNDLE --update, then restart "
        "the server (it learns the new site from its bundle)",
        "      the new site receives the CKKS key at the next `fedfms-secure keys rotate-he`",
    ]
    _emit(args, {"site": args.name, "folder": str(folder), "bundle": str(bundle) if bundle else None}, lines)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fedfms_secure.keys.lifecycle import check_crl_target, install_crl, revoke

    if args.server_bundle:
        check_crl_target(args.source, args.server_bundle)  # a wrong folder fails before anything is revoked
    entry = revoke(args.source, args.name, reason=args.reason, passphrase=_passphrase(args))
    crl = Path(args.source) / "ca" / "crl.pem"
    installed = install_crl(args.source, args.server_bundle) if args.server_bundle else None
    lines = [f"revoked site {args.name!r} (serial {entry.serial:x}, reason {entry.reason}); revocation list: {crl}"]
    if installed:
        lines.append(f"copied it to {installed}: the server refuses the site from its next call")
    else:
        lines.append(f"next: copy {crl} into the server bundle (`keys revoke ... --server-bundle BUNDLE` or "
                     "`keys export server ... --update`); the server refuses the site from its next call")
    lines.append("the CKKS key the site held still decrypts what it decrypted: run `fedfms-secure keys rotate-he` "
                 "at another site so that later rounds use a key it never had")
    _emit(args, {**entry.to_dict(), "crl": str(crl), "installed": str(installed) if installed else None}, lines)
    return 0


def _rotate_tls(args: argparse.Namespace) -> int:
    from fedfms_secure.keys.export import export_bundle
    from fedfms_secure.keys.lifecycle import check_crl_target, install_crl, rotate_tls

    if args.all and args.names:
        raise ConfigError("give site NAMEs or --all, not both")
    if not args.all and not args.names:
        raise ConfigError("name the site(s) to rotate, or give --all (every site and the server)")
    if args.server_bundle and not args.all:
        check_crl_target(args.source, args.server_bundle)  # a wrong folder fails before anything is rotated
    done = rotate_tls(args.source, None if args.all else args.names, server=args.all,
                      passphrase=_passphrase(args), days=args.days)
    bundles = {}
    if args.out_bundles:
        for party in done:
            out = Path(args.out_bundles) / party
            role = "server" if party == "server" else "client"
            bundles[party] = str(export_bundle(role, None if role == "server" else party, args.source, out,
                                               update=out.exists()))
    installed = None
    if args.server_bundle and "server" not in done:
        installed = install_crl(args.source, args.server_bundle)
    lines = [f"rotated the TLS certificates of {', '.join(done)}; the old ones are revoked (superseded)"]
    lines += [f"wrote the {party} bundle to {path}" for party, path in bundles.items()]
    if installed:
        lines.append(f"copied the revocation list to {installed}: the server refuses the old certificates now")
    if "server" in done:
        lines.append("the server's certificate changed: export the server bundle again and restart the server")
    elif not installed:
        lines.append("next: copy ca/crl.pem into the server bundle (--server-bundle) so the old certificates are "
                     "refused, and give each site its new bundle")
    _emit(args, {"rotated": done, "bundles": bundles, "crl_installed": str(installed) if installed else None}, lines)
    return 0


def _show(args: argparse.Namespace) -> int:
    from fedfms_secure.keys.keycheck import show_federation

    report = show_federation(args.source)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ck = report["ckks"]
    print(f"federation {report['federation']} (server host {report['server_host']}), folder {report['folder']}")
    print(f"CKKS key: {'generated at a site (keys he-init)' if ck['source'] == 'site' else 'dealt by this host'}; "
          f"parameters {str(ck['params_fingerprint'])[:16]}...")
    for p in report["parties"]:
        state = "REVOKED " + p["revoked"]["reason"] if p["revoked"] else ("EXPIRED" if p["expired"] else "valid")
        print(f"{p['party']:<20} {p['algorithm']:<11} serial {p['serial'][:16]:<16} not after "
              f"{p['not_after'][:10]} ({p['days_left']} d){' !' if p['expiring'] else ''}  {state}")
        print(f"{'':<20} sha256 {p['fingerprint_sha256']}")
        if p.get("envelope_key_sha256"):
            print(f"{'':<20} envelope key sha256 {p['envelope_key_sha256']} (compare it with the site's)")
        for key in p["keys"]:
            print(f"{'':<20} holds: {key}")
    for w in report["warnings"]:
        print(f"warning: {w}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fedfms_secure.keys.keycheck import verify_bundle

    report = verify_bundle(args.bundle, passphrase=_passphrase(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        who = f"{report['role']} bundle of {report['name']!r}" if report["role"] else "bundle"
        print(f"{args.bundle}: {who}: {'OK' if report['ok'] else str(len(report['problems'])) + ' problem(s)'}")
        for p in report["problems"]:
            print(f"  problem: {p['file']}: {p['problem']}\n           fix: {p['fix']}")
        for note in report["notes"]:
            print(f"  note: {note}")
    return 0 if report["ok"] else 1
