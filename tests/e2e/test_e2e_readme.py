"""The README's "Running a real federation" recipe, run as written: its code block is parsed, each
party runs its own lines in a folder of its own, with only the changes the README itself names for
one machine (127.0.0.1 for fl.example.org and 0.0.0.0, ``--rounds 1 --local-epochs 1`` for
``--rounds 10``; and a free port for 50051). Then a second run with the same bundles: a new
``--state`` for the server and the sites, and ``keys he-init`` again."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SITES = ("hosp_a", "hosp_b")


def readme_recipe() -> dict[str, list[str]]:
    """The recipe's command lines by party: ``operator``, ``coordinator``, ``site``, ``one site``,
    ``after`` (in order, as the README's comments head them)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Running a real federation\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    parties: dict[str, list[str]] = {}
    party = None
    for line in block.splitlines():
        if line.startswith("# "):
            head = line[2:].lower()
            party = next((p for p, word in (("operator", "operator"), ("coordinator", "coordinator"),
                                            ("one site", "at one site"), ("after", "once its daemon has finished"),
                                            ("site", "each site")) if word in head), party)
        elif line.startswith("fedfms-secure "):
            assert party is not None, f"a command before any party's heading: {line}"
            parties.setdefault(party, []).append(line)
    return parties


def test_the_recipe_has_every_party() -> None:
    recipe = readme_recipe()
    assert set(recipe) == {"operator", "coordinator", "site", "one site", "after"}
    assert any(" --exit-when-done" in line for line in recipe["coordinator"])
    assert any(line.startswith("fedfms-secure data synth") and "--names hosp_a,hosp_b" in line
               for line in recipe["site"])


def _one_machine(line: str, port: int, site: str) -> list[str]:
    """The README's own one-machine changes, and this site's name for hosp_a."""
    line = (line.replace("fl.example.org:50051", f"127.0.0.1:{port}").replace("0.0.0.0:50051", f"127.0.0.1:{port}")
            .replace("--rounds 10", "--rounds 1 --local-epochs 1"))
    if not line.startswith("fedfms-secure keys init") and not line.startswith("fedfms-secure data synth"):
        line = line.replace("hosp_a", site)
    argv = shlex.split(line)
    assert argv[0] == "fedfms-secure"
    return [sys.executable, "-m", "fedfms_secure", *argv[1:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _federate(root: Path, recipe: dict[str, list[str]], state_suffix: str, *, predict: bool = True) -> dict[str, str]:
    """One run of the recipe's coordinator, site and he-init lines (and, with ``predict``, its
    last lines); returns each party's log."""
    port = _free_port()

    def lines(party: str, site: str = "hosp_a") -> list[list[str]]:
        out = []
        for line in recipe[party]:
            line = re.sub(r"(?<=[a-z_])-state", f"-state{state_suffix}", line)  # server-state, not --state
            out.append(_one_machine(line, port, site))
        return out

    coordinator = root / "coordinator"
    logs = {}
    procs = {}
    (server_argv,) = lines("coordinator")
    procs["server"] = subprocess.Popen(server_argv, cwd=coordinator, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        for site in SITES:
            for argv in lines("site", site):
                if argv[3] == "client":
                    procs[site] = subprocess.Popen(argv, cwd=root / site, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True, env=_env())
                elif not (root / site / "data").exists():  # data synth, once per site folder
                    _run(argv, root / site)
        address = coordinator / f"server-state{state_suffix}" / "address.json"
        deadline = time.monotonic() + 60
        while not address.exists():  # "once the server runs"
            assert procs["server"].poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        for argv in lines("one site"):
            logs["he-init"] = _run(argv, root / "hosp_a")
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=420)
            logs[name] = out
            assert proc.returncode == 0, f"{name} failed:\n{out}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for site in SITES if predict else ():
        for argv in lines("after", site):
            logs[f"{site} predict"] = _run(argv, root / site)
    return logs


@pytest.mark.timeout(1500)
def test_the_readme_recipe_runs_as_written_twice_with_the_same_bundles(tmp_path: Path) -> None:
    recipe = readme_recipe()
    operator = tmp_path / "operator"
    for party in ("operator", "coordinator", *SITES):
        (tmp_path / party).mkdir()
    for argv in (_one_machine(line, 0, "hosp_a") for line in recipe["operator"]):
        _run(argv, operator)
    # "hand each party its bundle only"
    shutil.copytree(operator / "server-bundle", tmp_path / "coordinator" / "server-bundle")
    for site in SITES:
        shutil.copytree(operator / f"{site}-bundle", tmp_path / site / f"{site}-bundle")

    first = _federate(tmp_path, recipe, "")
    assert "federation finished: 1 rounds, final state at" in first["server"]
    assert "round 1 of 1 done: the global model it produced scores Dice" in first["hosp_a"]
    assert "in effect from round 1" in first["he-init"]
    for site in SITES:
        assert (tmp_path / site / f"{site}-state" / "final_model.pt").is_file()
        assert any((tmp_path / site / f"{site}-masks").iterdir())
    # the README's second run: the same bundles, a new --state everywhere, he-init again
    second = _federate(tmp_path, recipe, "-2", predict=False)
    assert "federation finished: 1 rounds" in second["server"]
    for site in SITES:
        assert "CKKS context mismatch" not in second[site]
        assert "round 1 of 1 done" in second[site]
        archived = list((tmp_path / site / f"{site}-bundle" / "he" / "archive").glob("*/epoch-1.ctx"))
        assert len(archived) == 1  # the first run's key, kept
        assert json.loads((tmp_path / site / f"{site}-state-2" / "initial.json").read_text())["dice"] >= 0
