"""``keys init`` sizes the CKKS quantisation from the plan's figures; the old flags keep working."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedfms_secure.cli import main
from fedfms_secure.keys.provision import FEDERATION_JSON


def _packing(prov: Path) -> dict:
    return json.loads((prov / FEDERATION_JSON).read_text())["ckks"]["params"]["packing"]


def test_init_from_the_plan_records_bound_step_and_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["keys", "init", "--server-host", "localhost", "--clients", "a,b,c", "--max-rounds", "5"]
    assert main([*base, "--out", str(tmp_path / "plan"), "--lr", "3e-3", "--local-steps", "20"]) == 0
    assert "step 5.86e-05 for a DP noise std of 0.00447" in capsys.readouterr().out
    pk = _packing(tmp_path / "plan")
    assert pk["bound"] == pytest.approx(0.06) and pk["noise_std"] == pytest.approx(3e-3 * math.sqrt(20) / 3)
    assert pk["quant_bits"] == 10 and pk["lanes"] == 3
    # the noise std given directly, with a looser error ratio: fewer bits
    assert main([*base, "--out", str(tmp_path / "given"), "--update-bound", "0.06", "--noise-std", "0.00447",
                 "--max-error-ratio", "0.03"]) == 0
    assert _packing(tmp_path / "given")["quant_bits"] == 8
    # the old flags: a fixed bound and bits, no noise recorded
    assert main([*base, "--out", str(tmp_path / "old"), "--update-bound", "0.5", "--quant-bits", "12"]) == 0
    old = _packing(tmp_path / "old")
    assert (old["bound"], old["quant_bits"]) == (0.5, 12) and "noise_std" not in old
    assert main([*base, "--out", str(tmp_path / "bits"), "--lr", "3e-3", "--local-steps", "20",
                 "--quant-bits", "12"]) == 0
    assert (_packing(tmp_path / "bits")["bound"], _packing(tmp_path / "bits")["quant_bits"]) == (pytest.approx(0.06), 12)
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    assert _packing(tmp_path / "default")["bound"] == 1.0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "half"), "--lr", "3e-3"]) != 0
    assert "needs the learning rate and the local steps per round (--lr and --local-steps)" in capsys.readouterr().err
    assert main(["keys", "init", "--server-host", "localhost", "--clients", "a,b", "--out", str(tmp_path / "big"),
                 "--lr", "1e-3", "--local-steps", "400", "--max-rounds", "500"]) != 0
    assert "do not fit" in capsys.readouterr().err
    assert not (tmp_path / "big").exists() and not (tmp_path / "half").exists()
