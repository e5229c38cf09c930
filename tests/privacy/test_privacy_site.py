"""Noise calibration and the persisted per-site accountant."""

from __future__ import annotations

import json
import os

import pytest
from opacus.accountants import create_accountant

from fedfms_secure.errors import ConfigError
from fedfms_secure.privacy import (
    STATE_FILE,
    PrivacyConfig,
    SitePrivacy,
    calibrate_noise,
    epsilon_of,
)
from fedfms_secure.privacy.accounting import RDP_ALPHAS
from fedfms_secure.privacy.budget import append_ledger
from fedfms_secure.privacy.site import check_against_server, check_local_state


def _open(tmp_path, **kw) -> SitePrivacy:
    config = kw.pop("config", PrivacyConfig(target_epsilon=4.0))
    return SitePrivacy.open(tmp_path, config, sample_rate=kw.pop("sample_rate", 0.1),
                            planned_steps=kw.pop("planned_steps", 100), **kw)  # fmt: skip


def _step(site: SitePrivacy, n: int) -> None:
    for _ in range(n):
        site.accountant.step(noise_multiplier=site.noise_multiplier, sample_rate=site.sample_rate)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_spends_the_target_at_the_planned_step(tmp_path, accountant) -> None:
    site = _open(tmp_path, config=PrivacyConfig(target_epsilon=4.0, accountant=accountant),
                 planned_steps=60)  # fmt: skip
    assert site.epsilon() == 0.0 and site.steps_taken == 0
    assert site.noise_multiplier > 0.3
    assert 3.9 <= site.epsilon_after(60) <= 4.0
    assert not site.would_exceed(60)
    assert site.would_exceed(70)
    _step(site, 30)
    assert 0 < site.epsilon() < 4.0
    assert not site.would_exceed(30) and site.would_exceed(40)


def test_more_planned_steps_need_more_noise() -> None:
    kw = dict(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, accountant="rdp")
    assert calibrate_noise(steps=1000, **kw) > calibrate_noise(steps=100, **kw)


def test_state_survives_reopen_and_equals_a_fresh_accountant(tmp_path) -> None:
    site = _open(tmp_path)
    _step(site, 25)
    site.save()
    again = _open(tmp_path)
    assert again.noise_multiplier == site.noise_multiplier
    assert again.steps_taken == 25
    assert again.epsilon() == pytest.approx(site.epsilon(), rel=1e-12)
    fresh = create_accountant(mechanism="rdp")
    for _ in range(25):
        fresh.step(noise_multiplier=site.noise_multiplier, sample_rate=0.1)
    assert again.epsilon() == pytest.approx(fresh.get_epsilon(delta=1e-5, alphas=RDP_ALPHAS))
    # and the budget only grows from there
    _step(again, 5)
    assert again.epsilon() > site.epsilon()


def test_persisted_file_holds_the_whole_state(tmp_path) -> None:
    site = _open(tmp_path)
    _step(site, 3)
    site.save()
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["noise_multiplier"] == site.noise_multiplier
    assert data["sample_rate"] == 0.1 and data["planned_steps"] == 100
    assert data["config"]["target_epsilon"] == 4.0
    assert data["accountant"] == {"mechanism": "rdp",
                                  "history": [[site.noise_multiplier, 0.1, 3]]}  # fmt: skip


def test_reopen_with_other_settings_is_refused(tmp_path) -> None:
    _open(tmp_path)
    with pytest.raises(ConfigError, match="original settings"):
        _open(tmp_path, planned_steps=200)
    with pytest.raises(ConfigError, match="original settings"):
        _open(tmp_path, config=PrivacyConfig(target_epsilon=8.0))


def test_reopen_with_another_sample_rate_explains_the_cause_and_the_cost_of_deleting(
    tmp_path,
) -> None:
    _open(tmp_path, sample_rate=0.1)
    with pytest.raises(ConfigError) as info:
        _open(tmp_path, sample_rate=0.125)
    message = str(info.value)
    assert "expected patients per step / training patients" in message
    assert "keep_empty_every" in message and "batch size" in message
    assert f"Deleting {STATE_FILE} does not start a new run" in message  # the ledger and the server remember
    with pytest.raises(ConfigError) as other:
        _open(tmp_path, planned_steps=200)
    assert "keep_empty_every" not in str(other.value)  # the hint is for the sample rate only


def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path, monkeypatch
) -> None:
    site = _open(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _step(site, 2)
    site.save()
    folder = os.path.realpath(tmp_path)
    state = os.path.join(folder, STATE_FILE)
    events = [(kind, os.path.realpath(path)) for kind, path in events]
    (first, temporary), *rest = events  # the one atomic writer's temporary file, beside the state
    assert first == "fsync" and os.path.dirname(temporary) == folder and temporary.endswith(".tmp")
    assert rest == [("replace", state), ("fsync", folder)]
    assert json.loads((tmp_path / STATE_FILE).read_text())["accountant"]["history"][0][2] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600


def test_corrupt_state_is_a_config_error_that_warns_against_deleting(tmp_path) -> None:
    _open(tmp_path)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="reset the spent budget"):
        _open(tmp_path)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="target_epsilon"):
        PrivacyConfig(target_epsilon=0)
    with pytest.raises(ConfigError, match="delta"):
        PrivacyConfig(delta=1.5)
    with pytest.raises(ConfigError, match="rdp, prv"):
        PrivacyConfig(accountant="gdp2")
    with pytest.raises(ConfigError, match="sample_rate"):
        calibrate_noise(target_epsilon=1, delta=1e-5, sample_rate=0, steps=10, accountant="rdp")
    with pytest.raises(ConfigError, match="cannot reach"):
        calibrate_noise(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=10**6,
                        accountant="rdp")  # fmt: skip


def test_epsilon_of_an_empty_history_is_zero() -> None:
    assert epsilon_of([], delta=1e-5, accountant="rdp") == 0.0


def _train_round(site: SitePrivacy, round_: int, steps: int) -> None:
    """What a site does for one trained round: steps, save, then one ledger line."""
    _step(site, steps)
    site.save()
    append_ledger(site.state_dir, {"round": round_, "steps": steps, "epsilon": site.epsilon(), "delta": 1e-5,
                                   "noise_multiplier": site.noise_multiplier, "sample_rate": 0.1,
                                   "accountant": "rdp"})


def test_a_rolled_back_accountant_is_refused_with_what_to_restore(tmp_path) -> None:
    site = _open(tmp_path, records=50, steps_per_round=10)
    _train_round(site, 0, 10)
    backup = (tmp_path / STATE_FILE).read_text()  # the accountant after round 1
    _train_round(site, 1, 10)
    check_local_state(tmp_path)  # ledger and accountant agree
    assert _open(tmp_path, records=50, steps_per_round=10).steps_taken == 20
    (tmp_path / STATE_FILE).write_text(backup)  # rolled back: round 2's budget would be spent again
    for attempt in (lambda: _open(tmp_path, records=50, steps_per_round=10), lambda: check_local_state(tmp_path)):
        with pytest.raises(ConfigError) as info:
            attempt()
        message = str(info.value)
        assert "accounts for 10 DP-SGD steps" in message and "records 20" in message
        assert f"Restore {STATE_FILE}" in message and "after the last trained round" in message


def test_a_lost_accountant_with_a_ledger_is_refused(tmp_path) -> None:
    _train_round(_open(tmp_path), 0, 5)
    (tmp_path / STATE_FILE).unlink()
    with pytest.raises(ConfigError, match="restore the file from a backup"):
        _open(tmp_path)
    with pytest.raises(ConfigError, match="restore the file from a backup"):
        check_local_state(tmp_path)


def test_check_against_server_refuses_fewer_rounds_than_the_server_recorded(tmp_path) -> None:
    site = _open(tmp_path, records=50, steps_per_round=10)
    check_against_server(tmp_path, 0)
    _train_round(site, 0, 10)
    _train_round(site, 1, 10)
    check_against_server(tmp_path, 2)
    check_against_server(tmp_path, 1)
    with pytest.raises(ConfigError) as info:
        check_against_server(tmp_path, 3)  # e.g. privacy.json and the ledger both restored from round 2
    message = str(info.value)
    assert "accounts for 2 trained round(s)" in message and "server recorded 3" in message
    assert f"Restore {STATE_FILE}" in message and "after round 3" in message
    (tmp_path / STATE_FILE).unlink()
    with pytest.raises(ConfigError, match="is missing: restore it"):
        check_against_server(tmp_path, 1)


def test_the_unit_and_the_number_of_records_are_fixed_when_the_run_starts(tmp_path) -> None:
    site = _open(tmp_path, records=40)
    assert site.config.unit == "patient" and site.records == 40
    with pytest.raises(ConfigError, match="fixed at 40"):
        _open(tmp_path, records=41)
    with pytest.raises(ConfigError, match="unit: patient then, slice now"):
        _open(tmp_path, config=PrivacyConfig(target_epsilon=4.0, unit="slice"), records=40)


def test_more_rounds_on_a_finished_run_names_what_changed_and_the_new_state_to_give(tmp_path) -> None:
    _open(tmp_path, planned_steps=100)
    with pytest.raises(ConfigError) as info:
        _open(tmp_path, planned_steps=200)
    message = str(info.value)
    assert "planned DP-SGD steps (rounds x local epochs x steps per epoch): 100 then, 200 now" in message
    assert "new --state" in message
    assert "PrivacyConfig(" not in message  # no raw dump of the settings
    assert "target_epsilon" not in message  # only what changed is named
