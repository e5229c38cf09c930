"""benchmarks/gpu.py on the tiny preset: every row trains in its own process and is measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import gpu


@pytest.mark.timeout(400)
def test_gpu_quick_measures_each_row_with_its_memory_and_ckks_time(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    assert gpu.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "- commit: " in text and "- device: cpu" in text and "no GPU was available" in text
    rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| fedmsa \| (no|standard|ghost) \|", line)]
    assert [r[1] for r in rows] == ["no", "standard", "ghost"]
    for row in rows:
        images_per_s, s_per_step, peak_mb, encode_s = (float(row[i]) for i in (5, 6, 7, 8))
        assert images_per_s > 0 and s_per_step > 0 and encode_s > 0
        assert 100 < peak_mb < 16_000  # a process's resident set, in MB
        assert row[4] == "46,644"  # tiny FedMSA's trainable parameters


def test_the_gpu_set_covers_both_modes_dp_and_both_sizes() -> None:
    assert {(m, c is not None, s) for m, c, s, _ in gpu.GPU_ROWS} == {
        (m, dp, s) for m in ("fedmsa", "fedsam") for dp in (False, True) for s in (256, 1024)}
    assert {s for _, _, s, _ in gpu.CPU_ROWS} == {128}
