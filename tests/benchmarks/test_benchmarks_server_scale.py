"""``server_scale.py --quick``: the real server process, a null server and two sites, on a toy vector."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_server_scale_quick_measures_every_phase_and_writes_its_results(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.server_scale", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "server_scale.json").read_text())
    assert result["header"]["command"].endswith(f"--quick --out {tmp_path}")
    (row,) = result["rows"]
    assert (row["mode"], row["sites"]) == ("fedmsa", 2)
    # every site's update reached the server, and every site downloaded a state of every chunk
    assert row["uploaded_bytes"] == 2 * row["bytes_per_site"] > row["chunks"]
    assert row["downloaded_bytes"] > row["uploaded_bytes"] / 2
    assert 0 < row["server_idle_rss_mb"] <= row["server_peak_rss_mb"]
    assert row["peak_state_disk_mb"] > 0
    for phase in ("commit_s", "upload_s", "send_s_null_server", "close_s", "download_s", "round1_upload_s",
                  "round1_close_s"):
        assert row[phase] > 0, phase
    markdown = (tmp_path / "server_scale.md").read_text()
    assert "| fedmsa | 2 |" in markdown and "Baseline" in markdown
