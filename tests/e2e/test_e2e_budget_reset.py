"""No budget can be reset at a site: real server and site daemons on loopback (mutual TLS, DP-SGD,
packed CKKS). The server remembers the rounds whose aggregate took each site's upload and tells a
site at join; a site whose accountant accounts for fewer refuses to train.

* the site's whole ``--state`` folder wiped after it contributed to round 1;
* ``privacy.json`` and the ledger both restored from a backup taken before the site trained.

(A deleted ledger alone resets nothing: the accountant in ``privacy.json`` holds every step; a lost
``privacy.json`` beside its ledger, or one with fewer steps than the ledger, is refused before the
site connects: ``tests/privacy/test_privacy_site.py``.)
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from fedfms_secure.privacy.budget import read_ledger
from fedfms_secure.privacy.site import STATE_FILE
from test_e2e_faults import Federation, _free_port


@pytest.fixture
def fed(tmp_path, data, provision):
    federation = Federation(tmp_path, data[:2], provision)
    try:
        yield federation
    finally:
        federation.cleanup()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fedfms_secure.data import synth_federation

    return synth_federation(tmp_path_factory.mktemp("data"), sites=2, seed=1, shape=(64, 64, 24))


def _after_round_one(fed: Federation) -> tuple[str, str, dict[str, bytes]]:
    """Runs the federation until round 1 has closed, then kills a site whose upload it took.

    Returns the address, that site's name and a copy of its state files as they were right after
    it opened its accountant (before it trained anything)."""
    address = f"127.0.0.1:{_free_port()}"
    fed.start_server(address, "--round-deadline", "120", "--min-sites", "1")
    for name in fed.sites:
        fed.start_site(name, address)
    backups = {}
    for name in fed.sites:
        state = fed.root / f"state_{name}"
        fed.wait_for(f"{name} to open its accountant", lambda: (state / STATE_FILE).exists())
        backups[name] = {p.name: p.read_bytes() for p in state.iterdir()
                         if p.is_file() and p.suffix in (".json", ".jsonl")}
    fed.wait_for("round 1 to close", lambda: (fed.status().get("round") or 0) >= 1)
    victim = fed.rounds()[0]["participants"][0]
    fed.expected_dead.add(victim)
    fed.procs[victim].send_signal(signal.SIGKILL)
    fed.procs[victim].wait(timeout=30)
    return address, victim, backups[victim]


def _restart_refused(fed: Federation, victim: str, address: str) -> str:
    fed.start_site(victim, address)
    code = fed.wait_exit(victim)
    log = fed.log(victim)
    assert code == 1, log[-3000:]
    assert "the server recorded 1 round(s) with this site's upload" in log, log[-3000:]
    return log


@pytest.mark.timeout(900)
def test_a_wiped_state_folder_does_not_start_the_budget_over(fed):
    address, victim, _ = _after_round_one(fed)
    state = fed.root / f"state_{victim}"
    shutil.rmtree(state)
    _restart_refused(fed, victim, address)
    assert read_ledger(state) == []  # nothing trained, nothing spent again


@pytest.mark.timeout(900)
def test_a_restored_backup_from_before_training_is_refused(fed):
    address, victim, backup = _after_round_one(fed)
    state = fed.root / f"state_{victim}"
    spent = read_ledger(state)
    assert [e["round"] for e in spent] == [0]
    (state / "privacy_ledger.jsonl").unlink(missing_ok=True)
    for name, content in backup.items():  # the accountant and ledger as they were before round 1
        (state / name).write_bytes(content)
    assert json.loads(backup[STATE_FILE])["accountant"]["history"] == []  # taken before any step
    log = _restart_refused(fed, victim, address)
    assert f"Restore {STATE_FILE}" in log
    assert [e["round"] for e in read_ledger(state)] == []  # the restored (empty) ledger gained nothing
