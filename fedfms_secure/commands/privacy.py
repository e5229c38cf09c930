"""``fedfms-secure privacy plan|report``: calibrate a budget before a run, read one after it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``privacy`` command group to the CLI."""
    p = sub.add_parser("privacy", help="plan a DP budget, or report what a site has spent")
    psub = p.add_subparsers(metavar="ACTION")

    plan = psub.add_parser("plan", help="the noise multiplier that spends a target epsilon in T steps")
    plan.add_argument("--target-epsilon", type=float, required=True, help="epsilon to spend over all the steps")
    plan.add_argument("--delta", type=float, help="default: min(1e-5, 1/(10 n)) with --records n; required otherwise")
    plan.add_argument("--sample-rate", type=float,
                      help="Poisson rate q (default: --expected-records-per-step / --records)")
    plan.add_argument("--records", type=int, help="training records of the site: patients (or slices at slice level; default: none)")
    plan.add_argument("--expected-records-per-step", type=float, help="the plan's batch size: expected patients per step (default: none)")
    plan.add_argument("--unit", choices=["patient", "slice"], default="patient", help="what one record is (default patient)")
    plan.add_argument("--steps", type=int, required=True, help="rounds x local epochs x steps per epoch")
    plan.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="privacy accountant")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    plan.set_defaults(handler=_plan)

    report = psub.add_parser("report", help="a site's spent budget, round by round")
    report.add_argument("--state", type=Path, required=True, help="the site's --state folder")
    report.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    report.set_defaults(handler=_report)


def plan_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> dict:
    """Calibrates sigma and returns it with the epsilon it really gives (at most the target)."""
    from fedfms_secure.errors import ConfigError
    from fedfms_secure.privacy.accounting import calibrate_noise, epsilon_of

    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ConfigError("--target-epsilon must be a positive number")
    if not 0 < delta < 1:
        raise ConfigError("--delta must be in (0, 1)")
    sigma = calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )
    epsilon = epsilon_of([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    return {"noise_multiplier": sigma, "epsilon": epsilon, "steps": steps, "accountant": accountant}


def _sample_rate(args: argparse.Namespace) -> tuple[float, float]:
    """(q, delta) from --sample-rate or --records and --expected-records-per-step."""
    from fedfms_secure.errors import ConfigError
    from fedfms_secure.privacy.budget import resolve_delta

    by_records = args.records is not None or args.expected_records_per_step is not None
    if by_records == (args.sample_rate is not None):
        raise ConfigError("give either --sample-rate, or --records with --expected-records-per-step")
    if not by_records:
        if args.delta is None:
            raise ConfigError("--delta is required with --sample-rate (or give --records to default it)")
        return args.sample_rate, args.delta
    if args.records is None or args.expected_records_per_step is None:
        raise ConfigError("--records and --expected-records-per-step go together")
    if args.records < 1 or not 0 < args.expected_records_per_step <= args.records:
        raise ConfigError("need --records >= 1 and 0 < --expected-records-per-step <= --records")
    return args.expected_records_per_step / args.records, resolve_delta(args.delta, args.records, args.unit)


def _plan(args: argparse.Namespace) -> int:
    sample_rate, delta = _sample_rate(args)
    result = plan_budget(args.target_epsilon, delta, sample_rate, args.steps, args.accountant)
    result.update(unit=args.unit, records=args.records, sample_rate=sample_rate, delta=delta)
    if args.json:
        print(json.dumps(result))
    else:
        per = "patient" if args.unit == "patient" else "slice (does not protect patients)"
        print(f"noise multiplier {result['noise_multiplier']:.4f} gives epsilon {result['epsilon']:.4f} "
              f"(target {args.target_epsilon:g}) per {per} at delta {delta:g} after {args.steps} steps "
              f"at sample rate {sample_rate:g} ({args.accountant.upper()} accountant)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedfms_secure.errors import ConfigError
    from fedfms_secure.privacy.budget import read_ledger
    from fedfms_secure.privacy.site import STATE_FILE

    records = read_ledger(args.state)
    state = args.state / STATE_FILE
    try:
        data = json.loads(state.read_text()) if state.exists() else {}
        target = data.get("config", {}).get("target_epsilon")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{state} is not a privacy state file: restore it from a backup") from None
    if not records and target is None:
        raise ConfigError(f"{args.state} holds no privacy state: is it a site's --state folder, and has it trained?")
    # a state written before the privacy unit existed was slice-level
    unit = data.get("unit") or data.get("config", {}).get("unit") or (records[-1].get("unit") if records else None) \
        or "slice"
    count = data.get("records") if data.get("records") is not None else (records[-1].get("records") if records else None)
    if args.json:
        print(json.dumps({"unit": unit, "records": count, "target_epsilon": target, "rounds": records}))
        return 0
    print(f"target epsilon: {target if target is not None else 'unknown'} per "
          + ("patient" if unit == "patient" else "SLICE: the guarantee does not protect patients"))
    print(f"records: {count if count is not None else 'unknown'} training {unit}s")
    print(f"{'round':>5}  {'steps':>6}  {'epsilon':>9}  {'delta':>9}  {'sigma':>7}  accountant")
    for r in records:
        print(f"{r['round'] + 1:>5}  {r['steps']:>6}  {r['epsilon']:>9.4f}  {r['delta']:>9.3g}  "
              f"{r['noise_multiplier']:>7.4f}  {r['accountant']}")
    return 0
