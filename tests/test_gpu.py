"""On a CUDA GPU: DP training, evaluation and predict run there (skipped where torch sees no GPU).

The CPU tests cover the same plumbing with ``--device cpu``; this module is what a machine with a
GPU adds: the model, Opacus' per-sample gradients and the noise on CUDA, the communicated vector
and the saved model back on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_dp_training_evaluation_and_predict_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedfms_secure.cli import main
    from fedfms_secure.commands.train import evaluate_model_file
    from fedfms_secure.data import synth_federation
    from fedfms_secure.data.synth import ellipses
    from fedfms_secure.model import apply_mode, build_model, flatten
    from fedfms_secure.privacy import PrivacyConfig, SitePrivacy
    from fedfms_secure.train import TrainConfig, train_local
    from fedfms_secure.train.baselines import BaselineOptions, train_central
    from fedfms_secure.train.metrics import evaluate_segmentation

    # DP-SGD of a site, on the GPU; the flat vector comes back as a CPU array
    model = build_model("tiny", seed=0).to("cuda")
    names = apply_mode(model, "fedmsa")
    before = flatten(model, names)
    data = ellipses(16)
    for clipping in ("standard", "ghost"):
        site = SitePrivacy.open(tmp_path / clipping, PrivacyConfig(unit="slice"), sample_rate=0.5, planned_steps=4)
        result = train_local(model, data, TrainConfig(epochs=2, batch_size=8, clipping=clipping), site)
        assert result.steps == 4 and 0 < result.epsilon <= 8.0
    assert all(p.device.type == "cuda" for p in model.parameters())
    after = flatten(model, names)
    assert isinstance(after, np.ndarray) and np.isfinite(after).all() and (after != before).mean() > 0.5
    scores = evaluate_segmentation(model, data)
    assert 0.0 <= scores["dice_mean"] <= 1.0

    # train central on cuda, evaluate and predict its saved model on cuda
    synth_federation(tmp_path / "fed", sites=1, seed=3, shape=(64, 64, 8), volumes=(20, 20))
    out = tmp_path / "out"
    logged = train_central(tmp_path / "fed", BaselineOptions(epochs=3, learning_rate=3e-3, out=out, device="cuda",
                                                             epsilon=8.0, batch_size=8))
    scored = evaluate_model_file(out / "central_model.pt", tmp_path / "fed", split="val",
                                 split_file=out / "splits" / "site_1.json", device="cuda:0")
    assert scored["sites"][0]["dice_mean"] == pytest.approx(logged["sites"][0]["dice_mean"], abs=1e-3)
    case = sorted((tmp_path / "fed" / "site_1" / "imagesTr").iterdir())[0]
    assert main(["predict", "--model", str(out / "central_model.pt"), "--input", str(case), "--out",
                 str(tmp_path / "masks"), "--device", "cuda", "--json"]) == 0
    assert (tmp_path / "masks" / case.name).is_file()
    assert json.loads(capsys.readouterr().out)
