"""The benchmark scripts on toy sizes, so that they cannot rot: real federations, codecs and training.

``python -m benchmarks.privacy_budget --toy`` runs two real federations (server and two site processes, mutual TLS,
DP-SGD, packed CKKS; patient-level DP, then slice-level) and two baselines, so it takes a minute or two.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _common, ckks_vs_plain, communication, overhead, privacy_budget
from fedfms_secure.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.privacy_budget", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.timeout(400)
def test_privacy_budget_toy_writes_csv_markdown_and_plots_and_resumes(tmp_path: Path) -> None:
    done = _run_script("--toy", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[1/4]" in done.stderr and "ETA" in done.stderr  # progress lines

    with open(tmp_path / "privacy_budget_toy.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == privacy_budget.COLUMNS
        rows = list(reader)
    assert [(r["kind"], r["unit"], r["epsilon"]) for r in rows] == [
        ("federated", "patient", "8"), ("central", "patient", "8"), ("local", "patient", "8"),
        ("federated", "slice", "8")]
    fed = rows[0]
    assert fed["he"] == "true" and fed["mode"] == "fedmsa"
    assert 0 < float(fed["epsilon_spent"]) <= 8.0 + 1e-6  # the sites' ledgers, at most the target
    assert float(fed["bytes_up_per_round"]) > 0 and float(fed["bytes_down_per_round"]) > float(fed["bytes_up_per_round"])
    assert float(fed["seconds_per_round"]) > 0
    assert int(fed["communicated_params"]) > 0 and int(fed["trainable_params"]) > 0
    for row in rows:
        assert 0.0 <= float(row["dice_mean"]) <= 1.0
        assert row["rounds"] == "1" and row["config"] == fed["config"]
    assert all(float(r["bytes_up_per_round"]) == 0 for r in rows[1:3])  # nothing travels in a baseline
    for row in rows[:3]:  # every DP run spends at most its target
        assert 0 < float(row["epsilon_spent"]) <= 8.0 + 1e-6

    md = (tmp_path / "privacy_budget_toy.md").read_text()
    for key in ("- command: `", "- commit: ", "- machine: ", "- seeds: 0", "- date: "):
        assert key in md
    assert "-m benchmarks.privacy_budget --toy" in md
    assert md.count("| federated |") == 2 and "| central |" in md and "| local |" in md
    assert md.count("| patient |") == 3 and md.count("| **slice** (not patients) |") == 1
    for suffix in ("dice", "bytes", "seconds"):
        png = tmp_path / f"privacy_budget_toy_{suffix}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000

    again = _run_script("--toy", "--out", str(tmp_path), timeout=120)  # every run is in the CSV: nothing to do
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("[skip]") == 4
    assert len(_common.read_csv(tmp_path / "privacy_budget_toy.csv")) == 4


def test_privacy_budget_default_grid_and_bad_input() -> None:
    runs = privacy_budget.build_runs(privacy_budget.GRID_EPSILONS, privacy_budget.MODES, (True, False), [0],
                                     (math.inf, 8.0), True, (math.inf, 8.0))  # fmt: skip
    federated = [r for r in runs if r.kind == "federated"]
    # patient-level grid, plus one slice-level run per mode (epsilon inf has no unit: skipped)
    assert len(federated) == 6 * 2 * 2 + 2 and len(runs) - len(federated) == 2 * 2 * 2
    assert {r.unit for r in runs if r.kind != "federated"} == {"patient"}
    assert [(r.mode, r.epsilon) for r in federated if r.unit == "slice"] == [("fedmsa", 8.0), ("fedsam", 8.0)]
    assert len({r.key("c") for r in runs}) == len(runs)
    done = _run_script("--toy", "--epsilons", "0", timeout=60)
    assert done.returncode == 2 and "must be positive" in done.stderr


def test_csv_of_another_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grid.csv"
    _common.append_csv(path, ("a", "b"), [{"a": 1, "b": math.inf}])
    assert _common.read_csv(path) == [{"a": "1", "b": "inf"}]
    with pytest.raises(ConfigError, match="has columns"):
        _common.append_csv(path, ("a", "c"), [{"a": 2, "c": 3}])


def test_communication_tiny_measures_real_messages(tmp_path: Path) -> None:
    assert communication.main(["--presets", "tiny", "--sites", "2", "--rounds", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "communication.json").read_text())["rows"]
    by = {(r["mode"], r["scheme"]): r for r in rows}
    assert set(by) == {(m, s) for m in ("fedmsa", "fedsam") for s in ("fp32", "plain", "ckks")}
    for (mode, scheme), r in by.items():
        assert r["bytes_up_per_site"] > 0 and r["bytes_down_per_site"] > 0
        assert r["communicated_params"] == r["values"] > 0
    assert by[("fedsam", "ckks")]["communicated_params"] > by[("fedmsa", "ckks")]["communicated_params"]
    for mode in ("fedmsa", "fedsam"):
        ckks, fp32, plain = by[(mode, "ckks")], by[(mode, "fp32")], by[(mode, "plain")]
        assert ckks["bytes_up_per_param"] < 8.0  # packed CKKS: under the 8 B/param budget
        assert 4.0 < fp32["bytes_up_per_param"] < 4.1  # 4 B/param plus message framing
        assert 8.0 < plain["bytes_up_per_param"] < 8.1  # --no-he sends float64
        # the global state is a sum: both polynomials, no seed
        assert 1.8 < ckks["bytes_down_per_site"] / ckks["bytes_up_per_site"] < 2.1
    md = (tmp_path / "communication.md").read_text()
    assert "- machine: " in md and "| tiny | fedsam |" in md


def test_overhead_toy_gives_the_three_ratios(tmp_path: Path) -> None:
    assert overhead.main(["--toy", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overhead.json").read_text())
    (result,) = data["results"]
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    names = {r["ratio"] for r in result["ratios"]}
    assert names == {"DP step / non-DP step", "round with CKKS / round without", "FedMSA round / FedSAM round"}
    for r in result["ratios"]:
        assert math.isfinite(r["value"]) and r["value"] > 0
        assert r["value"] == pytest.approx(r["numerator_s"] / r["denominator_s"])
        if r["ratio"].startswith("round with CKKS"):  # same training and evaluation: only the codec differs
            assert r["same_training"] > 1.0
    assert len(result["rows"]) == 8
    for row in result["rows"]:
        assert row["train_s"] > 0 and row["steps"] >= 1
        assert (row["encrypt_s"] > 0) or not row["he"]
    assert data["skipped"]  # vit_b is never measured by --toy
    assert "vit_b" in (tmp_path / "overhead.md").read_text()


@pytest.mark.timeout(400)
def test_ckks_vs_plain_toy_compares_runs_one_step_and_the_chaos_floor(tmp_path: Path) -> None:
    args = ["--seeds", "0", "--clients", "2", "--rounds", "2", "--local-epochs", "1", "--perturb", "1e-12",
            "--out", str(tmp_path)]
    assert ckks_vs_plain.main(args) == 0
    data = json.loads((tmp_path / "ckks_vs_plain.json").read_text())
    (run,) = data["runs"]
    assert len(run["dice_plain"]) == len(run["dice_ckks"]) == 2
    # one aggregation of the same deltas: CKKS's error is quantisation only, less than one step of
    # the plan's quantisation per site's upload (stochastic rounding)
    for step in run["one_step"]:
        assert 0 < step["quant_step"] < 1e-3, step
        assert 0 < step["max_abs_error"] < 2 * step["quant_step"], step
        assert abs(step["delta"]) < 0.002, step
    exact, nudged = run["sensitivity"]
    assert exact["size"] == 0 and exact["max_abs_theta_delta"] == 0 and len(exact["dice"]) == 2
    assert nudged["size"] == 1e-12 and nudged["max_abs_theta_delta"] > 0  # the noise did reach the weights
    md = (tmp_path / "ckks_vs_plain.md").read_text()
    assert "## Whole runs" in md and "## One aggregation" in md and "## Training's own sensitivity" in md
    assert "| 0 | +-1e-12 |" in md


def test_every_script_is_a_module_of_the_package_and_names_itself_as_one() -> None:
    import importlib

    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert {"ckks_vs_plain", "communication", "data_loading", "demo_matrix", "he_bench", "model_speed", "overhead",
            "pretrain_tiny", "pretrained_vs_random", "privacy_budget"} <= set(scripts)
    for name in scripts:
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(module.main) and module._common is _common, name
        source = Path(module.__file__).read_text()
        assert "sys.path" not in source and "rev-parse" not in source, name  # stamps come from _common
    script = ROOT / "benchmarks" / "he_bench.py"
    assert _common.command_line([str(script), "--out", "a b"]) == ".venv/bin/python -m benchmarks.he_bench --out 'a b'"
