"""benchmarks.fed_vs_central on toy sizes: real anatomy, real training, steps counted per run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from benchmarks import fed_vs_central as fvc
from fedfms_secure.data.anatomy import anatomy_federation


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fvc")
    anatomy_federation(out / "data", sites=2, cases=2, slices=6, seed=0)
    return out


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"rounds": 2, "local_epochs": 1, "batch": 32, "epsilon": 8.0, "sites": 2, **kw})


def test_local_scores_each_model_everywhere_and_counts_steps(toy: Path) -> None:
    run = fvc._run("local", toy / "data", toy / "local", 0, _args())
    assert set(run["per_site"]) == set(run["everywhere"]) == {"site_1", "site_2"}
    assert all(0 <= d <= 1 for d in [*run["per_site"].values(), *run["everywhere"].values()])
    # 1 training case x 6 slices (empty slices partly kept) per site, batch 32: one step per epoch
    assert run["steps"] == {"site_1": 2, "site_2": 2}
    assert run["dice"] == pytest.approx(sum(run["per_site"].values()) / 2)


def test_levers_change_the_run_and_the_step_count(toy: Path) -> None:
    plain = fvc._fedavg(fvc.Lever("plain"), toy / "data", 0, _args())
    small = fvc._fedavg(fvc.Lever("small batches", batch=2), toy / "data", 0, _args())
    kept = fvc._fedavg(fvc.LEVERS["keep-adam"], toy / "data", 0, _args())
    assert len(plain["dice_per_round"]) == 2 and plain["rounds"] == 2
    assert all(small["steps"][s] > plain["steps"][s] for s in plain["steps"])
    # round 1 is the same for a kept and a fresh Adam state; round 2 starts from the kept moments
    assert kept["dice_per_round"][0] == pytest.approx(plain["dice_per_round"][0])
    assert kept["dice"] != plain["dice"]


def test_summary_and_markdown_give_mean_std_and_steps() -> None:
    runs = [{"kind": "central", "seed": s, "dice": d, "per_site": {"a": d}, "steps": {"central": 75},
             "wall_seconds": 1.0} for s, d in ((0, 0.70), (1, 0.74))]
    runs += [{"kind": "local", "seed": s, "dice": d, "per_site": {"a": d, "b": d + 0.1}, "steps": {"a": 25, "b": 25},
              "everywhere": {"a": 0.5, "b": 0.6}, "wall_seconds": 1.0} for s, d in ((0, 0.6), (1, 0.62))]
    summary = fvc.summarize(runs, ["central", "local"])
    assert summary["central"]["dice_mean"] == pytest.approx(0.72)
    assert summary["central"]["dice_std"] == pytest.approx(math.sqrt(2) * 0.02)
    assert summary["local"]["best_site_mean"] == pytest.approx(0.71)
    assert summary["local"]["best_everywhere_mean"] == pytest.approx(0.6)
    text = fvc.markdown({"command": "x"}, summary, runs, ["central", "local"])
    assert "| 0.720 ± 0.028 | 0.700, 0.740 |  | 75 |" in text
    assert "0.710 ± 0.014 / 0.600 ± 0.000" in text and "25 / 25 per site" in text


def test_dp_baseline_counts_patient_steps_and_spends_at_most_its_target(toy: Path) -> None:
    run = fvc._run("local-dp", toy / "data", toy / "local-dp", 0, _args(epsilon=8.0, batch=32))
    # one training patient per site: q = 1, one DP-SGD step per epoch whatever its slices
    assert run["steps"] == {"site_1": 2, "site_2": 2}
    assert 0 < run["epsilon_spent"] <= 8.0 + 1e-6
    assert set(run["everywhere"]) == {"site_1", "site_2"}


@pytest.mark.timeout(300)
def test_dp_federation_through_the_daemons_reports_epsilon_and_patient_steps(toy: Path) -> None:
    run = fvc._run("federated-dp-prv", toy / "data", toy / "fed-dp", 0, _args(epsilon=4.0))
    assert len(run["dice_per_round"]) == 2 and set(run["per_site"]) == {"site_1", "site_2"}
    assert 0 < run["epsilon_spent"] <= 4.0 + 1e-6
    assert run["steps"] == {"site_1": 2, "site_2": 2}  # patients, not slices, make the steps under DP
    report = (toy / "fed-dp" / "report.json").read_text()
    assert '"accountant": "prv"' in report and '"batch_size": 32' in report
    for site in ("site_1", "site_2"):  # the site daemons themselves ran the PRV accountant
        privacy = json.loads((toy / "fed-dp" / "run" / site / "privacy.json").read_text())
        assert privacy["config"]["accountant"] == "prv" and privacy["unit"] == "patient"


def test_site_gains_compare_each_site_with_its_own_model_seed_by_seed() -> None:
    runs = [{"kind": "local", "seed": 0, "per_site": {"a": 0.60, "b": 0.80}},
            {"kind": "local", "seed": 1, "per_site": {"a": 0.62, "b": 0.70}},
            {"kind": "federated", "seed": 0, "per_site": {"a": 0.70, "b": 0.75}},
            {"kind": "federated", "seed": 1, "per_site": {"a": 0.66, "b": 0.74}}]
    gains = fvc.site_gains(runs, "federated", "local")
    assert gains["per_site"] == pytest.approx({"a": 0.07, "b": -0.005})
    assert (gains["wins"], gains["pairs"]) == (3, 4)
    assert fvc.site_gains(runs, "federated", "local-dp")["pairs"] == 0


def test_with_keeps_an_earlier_invocations_runs_and_reports_them_together(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier.jsonl"
    runs = [{"kind": "local", "seed": 0, "dice": 0.70, "per_site": {"site_1": 0.7, "site_2": 0.7},
             "steps": {"site_1": 5, "site_2": 5}, "wall_seconds": 1.0},
            {"kind": "federated", "seed": 0, "dice": 0.72, "per_site": {"site_1": 0.75, "site_2": 0.69},
             "steps": {"site_1": 5, "site_2": 5}, "wall_seconds": 1.0},
            {"kind": "federated", "seed": 7, "dice": 0.1, "per_site": {"site_1": 0.1}, "steps": {}, "wall_seconds": 1.0}]
    earlier.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert fvc.main(["--seeds", "0", "--kinds", "--with", str(earlier), "--out", str(tmp_path), "--name", "merged",
                     "--sites", "2", "--cases", "2", "--slices", "6"]) == 0
    kept = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["seed"]) for r in kept] == [("local", 0), ("federated", 0)]  # seed 7 is not asked for
    md = (tmp_path / "merged.md").read_text()
    assert "read from earlier.jsonl" in md and "| federated | local | +0.050 | -0.010 | 1 of 2 |" in md
