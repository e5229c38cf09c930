"""A site whose privacy budget is spent retires; the rounds still complete with the rest.

Real daemons on loopback: one server and two sites. site_2's state folder holds a budget that an
earlier run with the same plan already spent, so it cannot train another round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfms_secure.config import ServerConfig
from fedfms_secure.data import load_site, synth_federation
from fedfms_secure.demo import _spawn, _stop_all, _wait_for_address
from fedfms_secure.privacy.accounting import extend_history
from fedfms_secure.privacy.budget import read_ledger
from fedfms_secure.privacy.planning import open_site_privacy, plan_records
from fedfms_secure.server.store import StateStore

ROUNDS = 2


def spend_most_of_the_budget(site_dir: Path, state: Path) -> float:
    """Opens the site's privacy state exactly as the client will, and spends all but one step."""
    plan = ServerConfig(keys=Path("-"), state=Path("-"))
    state.mkdir(parents=True)
    train = load_site(site_dir, image_size=64, split_file=state / "split.json", seed=plan.seed).train
    records = plan_records(train, unit="patient", batch_size=plan.batch_size)
    privacy = open_site_privacy(state, records, epochs=plan.local_epochs, rounds=ROUNDS, epsilon=8.0, delta=None,
                                max_grad_norm=1.0)
    planned = privacy.planned_steps
    privacy.accountant.history = extend_history(
        privacy.accountant.history, noise_multiplier=privacy.noise_multiplier, sample_rate=privacy.sample_rate,
        steps=planned - 1,
    )
    privacy.save()
    return privacy.epsilon()


@pytest.fixture(scope="module")
def run(tmp_path_factory, provision):
    root = tmp_path_factory.mktemp("retire")
    sites = synth_federation(root / "data", sites=2, seed=0, shape=(64, 64, 24))
    keys = provision(root, ["site_1", "site_2"], federation="r", rounds=ROUNDS)
    spent = spend_most_of_the_budget(sites[1], root / "state_site_2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "fedfms_secure"]
    procs = {"server": _spawn([*cli, "server", "--keys", str(keys.bundles["server"]), "--address", "127.0.0.1:0",
                               "--state", str(root / "state_server"), "--rounds", str(ROUNDS), "--exit-when-done"],
                              root / "server.log", env)}
    try:
        address = _wait_for_address(root / "state_server", procs["server"], root / "server.log")
        for name, site in zip(("site_1", "site_2"), sites):
            procs[name] = _spawn([*cli, "client", "--keys", str(keys.bundles[name]), "--server", address, "--data",
                                  str(site), "--state", str(root / f"state_{name}"), "--epsilon", "8"],
                                 root / f"{name}.log", env)
        keys.he_init("site_1", address)  # the sites started first: they wait for their key
        codes = {name: proc.wait(timeout=600) for name, proc in procs.items()}
    finally:
        _stop_all(procs)
    return root, codes, spent


def test_every_daemon_exits_cleanly(run):
    root, codes, _ = run
    assert codes == {"server": 0, "site_1": 0, "site_2": 0}, (root / "site_2.log").read_text()[-2000:]


def test_the_exhausted_site_retires_with_a_clear_log_line(run):
    root, _, spent = run
    log = (root / "site_2.log").read_text()
    assert "retiring" in log and "privacy budget" in log
    retired = StateStore(root / "state_server").retired()
    assert list(retired) == ["site_2"] and "past the target 8" in retired["site_2"]
    assert read_ledger(root / "state_site_2") == []  # it never trained
    assert 0 < spent < 8.0


def test_the_rounds_complete_with_the_remaining_site(run):
    root, _, _ = run
    rounds = [json.loads(line) for line in (root / "state_server" / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["participants"]) for r in rounds] == [(0, ["site_1"]), (1, ["site_1"])]
    ledger = read_ledger(root / "state_site_1")
    assert [r["round"] for r in ledger] == [0, 1]
    assert 0 < ledger[0]["epsilon"] < ledger[1]["epsilon"] <= 8.0


def test_a_site_whose_accountant_is_lost_refuses_to_start(run, tmp_path):
    root, _, _ = run
    state = tmp_path / "state"
    state.mkdir()
    (state / "privacy_ledger.jsonl").write_text((root / "state_site_1" / "privacy_ledger.jsonl").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "fedfms_secure", "client", "--keys", str(root / "bundles" / "site_1"), "--server", "127.0.0.1:1",
         "--data", str(root / "data" / "site_1"), "--state", str(state), "--connect-timeout", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "privacy.json is missing" in result.stderr and "restore the file" in result.stderr
