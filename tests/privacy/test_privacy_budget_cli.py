"""Budget policy (delta), the per-round ledger, and `fedfms-secure privacy plan|report`."""

from __future__ import annotations

import json

import pytest

from fedfms_secure.cli import main
from fedfms_secure.errors import ConfigError
from fedfms_secure.privacy.accounting import epsilon_of
from fedfms_secure.privacy.budget import append_ledger, max_delta, read_ledger, resolve_delta


def test_delta_defaults_well_below_one_over_n_and_larger_is_refused():
    assert resolve_delta(None, 100) == 1e-5
    assert resolve_delta(None, 1_000_000) == pytest.approx(1e-7)
    assert resolve_delta(1e-4, 100) == 1e-4
    with pytest.raises(ConfigError, match="well below 1/n"):
        resolve_delta(max_delta(100) * 1.01, 100)


def test_plan_prints_a_sigma_whose_epsilon_is_at_most_the_target(capsys):
    args = ["privacy", "plan", "--target-epsilon", "4", "--delta", "1e-5", "--sample-rate", "0.25", "--steps", "60"]
    for accountant in ("rdp", "prv"):
        assert main([*args, "--accountant", accountant, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert set(out) == {"noise_multiplier", "epsilon", "steps", "accountant", "unit", "records", "sample_rate",
                            "delta"}
        assert out["accountant"] == accountant and out["steps"] == 60
        assert 3.8 < out["epsilon"] <= 4.0
        again = epsilon_of([(out["noise_multiplier"], 0.25, 60)], delta=1e-5, accountant=accountant)
        assert again == pytest.approx(out["epsilon"])


def test_delta_defaults_from_the_number_of_patients():
    # 200 patients: 1/(10 n) = 5e-4 > 1e-5; 200000 patients: 1/(10 n) = 5e-7
    assert resolve_delta(None, 200, "patient") == 1e-5
    assert resolve_delta(None, 200_000, "patient") == pytest.approx(5e-7)
    with pytest.raises(ConfigError, match="training patients"):
        resolve_delta(1e-3, 200, "patient")


def test_plan_takes_records_and_expected_records_per_step(capsys):
    args = ["privacy", "plan", "--target-epsilon", "8", "--records", "60", "--expected-records-per-step", "30",
            "--steps", "50", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sample_rate"] == 0.5 and out["records"] == 60 and out["unit"] == "patient"
    assert out["delta"] == 1e-5  # min(1e-5, 1/(10 * 60))
    again = epsilon_of([(out["noise_multiplier"], 0.5, 50)], delta=1e-5, accountant="rdp")
    assert again == pytest.approx(out["epsilon"]) and 7.8 < again <= 8.0
    assert main(["privacy", "plan", "--target-epsilon", "8", "--records", "60", "--sample-rate", "0.5",
                 "--steps", "5"]) == 1
    assert "either --sample-rate, or --records" in capsys.readouterr().err
    assert main(["privacy", "plan", "--target-epsilon", "8", "--records", "60", "--steps", "5"]) == 1
    assert "go together" in capsys.readouterr().err


def test_plan_refuses_an_unreachable_target(capsys):
    code = main(["privacy", "plan", "--target-epsilon", "8", "--delta", "1e-5", "--sample-rate", "1.5", "--steps", "10"])
    assert code == 1 and "sample_rate" in capsys.readouterr().err


def test_report_prints_the_ledger_round_by_round(tmp_path, capsys):
    for r, eps in enumerate([2.5, 4.0, 5.1]):
        append_ledger(tmp_path, {"round": r, "steps": 15, "epsilon": eps, "delta": 1e-5,
                                 "noise_multiplier": 1.2, "sample_rate": 0.3, "accountant": "rdp"})
    assert [r["epsilon"] for r in read_ledger(tmp_path)] == [2.5, 4.0, 5.1]
    assert main(["privacy", "report", "--state", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["unit"] == "slice" and report["records"] is None  # lines written before the unit existed
    assert main(["privacy", "report", "--state", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[:3] == ["3", "15", "5.1000"]


def test_report_names_a_corrupt_ledger_or_a_wrong_folder(tmp_path, capsys):
    assert main(["privacy", "report", "--state", str(tmp_path / "nope")]) == 1
    assert "--state" in capsys.readouterr().err
    (tmp_path / "privacy_ledger.jsonl").write_text('{"round": 0\n')
    assert main(["privacy", "report", "--state", str(tmp_path)]) == 1
    assert "privacy_ledger.jsonl, line 1" in capsys.readouterr().err


def test_a_half_written_last_ledger_line_is_ignored(tmp_path):
    append_ledger(tmp_path, {"round": 0, "epsilon": 2.0})
    with open(tmp_path / "privacy_ledger.jsonl", "a") as fh:
        fh.write('{"round": 1, "eps')  # a crash while appending
    assert [r["round"] for r in read_ledger(tmp_path)] == [0]


def test_report_gives_the_unit_and_the_number_of_records(tmp_path, capsys):
    from fedfms_secure.privacy import PrivacyConfig, SitePrivacy

    for unit, n in (("patient", 40), ("slice", 250)):
        state = tmp_path / unit
        SitePrivacy.open(state, PrivacyConfig(unit=unit), sample_rate=10 / n, planned_steps=20, records=n)
        assert main(["privacy", "report", "--state", str(state), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["unit"], report["records"]) == (unit, n)
        assert main(["privacy", "report", "--state", str(state)]) == 0
        text = capsys.readouterr().out
        assert ("does not protect patients" in text) == (unit == "slice")
        assert f"records: {n} training {unit}s" in text
