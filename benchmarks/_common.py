"""What every benchmark script shares: the header of its results, progress lines with an ETA, CSV rows.

The header says where a number came from: the machine (architecture, CPU cores, GPU or "no GPU",
torch and Python versions), the commit (with "+ uncommitted changes" when the library or the
benchmarks differ from it), the seeds, the exact command line and the date (UTC). Every script
takes its header, commit stamp and command line from here.

``benchmarks`` is a package: scripts run from the repository root as ``python -m benchmarks.NAME``
and import this module as ``from benchmarks import _common``; tests import it the same way.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def commit() -> str:
    """Short hash of HEAD, plus " + uncommitted changes (FILES)" when the code that produces numbers (the
    library or the benchmark scripts, untracked ones included) differs from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", "fedfms_secure/*.py", "benchmarks/*.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    files = [line[3:].strip() for line in dirty.splitlines() if line.strip()]
    if not files:
        return sha
    listed = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    return f"{sha} + uncommitted changes ({listed})"


def gpu_name() -> str:
    """The CUDA device torch would use, or "no GPU"."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "no GPU"
    if not torch.cuda.is_available():
        return "no GPU"
    return torch.cuda.get_device_name(0)


def machine() -> str:
    """One line: architecture, CPU cores, GPU, Python and torch versions."""
    try:
        import torch

        torch_version = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:  # pragma: no cover
        torch_version = ""
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu_name()}, "
            f"{platform.python_implementation()} {platform.python_version()}{torch_version}")  # fmt: skip


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, run from the repository root: ``argv[0]`` is the script
    (its path, as ``python -m`` sets it), the rest its arguments. A script of this package is named
    as its module (``.venv/bin/python -m benchmarks.NAME ...``)."""
    args = list(sys.argv if argv is None else argv)
    script = Path(args[0]) if args else Path("?")
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        return shlex.join([".venv/bin/python", script.as_posix(), *args[1:]])
    if script.parent == Path("benchmarks") and script.suffix == ".py":
        return shlex.join([".venv/bin/python", "-m", f"benchmarks.{script.stem}", *args[1:]])
    return shlex.join([".venv/bin/python", script.as_posix(), *args[1:]])


def script_argv(script: str, argv: Sequence[str] | None) -> list[str]:
    """``[script, *arguments]`` for :func:`command_line`: ``argv`` as given to a script's ``main``,
    or this process's own arguments when it is None."""
    return [script, *(sys.argv[1:] if argv is None else argv)]


def header(*, seeds: Sequence[int] | int | None = None, argv: Sequence[str] | None = None,
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The header of a results file: machine, commit, seeds, command, date, then ``extra`` in order."""
    out: dict[str, Any] = {
        "command": command_line(argv),
        "commit": commit(),
        "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if seeds is not None:
        out["seeds"] = ", ".join(str(s) for s in ([seeds] if isinstance(seeds, int) else seeds))
    out.update(extra)
    return out


def header_markdown(head: Mapping[str, Any]) -> list[str]:
    """The header as markdown bullet lines (the command in backticks)."""
    return [f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in head.items()]


def header_caption(head: Mapping[str, Any]) -> str:
    """A short footer for plots: commit, machine and date."""
    return f"commit {head.get('commit')} | {head.get('machine')} | {head.get('date')}"


class Progress:
    """Prints ``[i/N] label`` before each run and its time with an ETA after, to ``stream`` (stderr)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.spent = 0.0
        self._started = 0.0
        self._label = ""

    def start(self, label: str) -> None:
        self._label = label
        self._started = time.monotonic()
        print(f"[{self.done + 1}/{self.total}] {label} ...", file=self.stream, flush=True)

    def finish(self, note: str = "") -> float:
        """Marks the current run done; returns its seconds."""
        seconds = time.monotonic() - self._started
        self.done += 1
        self.spent += seconds
        left = self.total - self.done
        eta = f", ETA {_duration(self.spent / self.done * left)} for {left} more" if left else ", all done"
        print(f"[{self.done}/{self.total}] {self._label}: {seconds:.0f} s{(' ' + note) if note else ''}{eta}",
              file=self.stream, flush=True)  # fmt: skip
        return seconds

    def skip(self, label: str, why: str) -> None:
        """Counts a run that needs no work (e.g. already in the CSV); it does not enter the ETA."""
        self.total -= 1
        print(f"[skip] {label}: {why}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by :func:`append_csv` (empty when the file does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def append_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Appends ``rows`` (writing the column line first for a new file) and flushes to disk.

    Raises ConfigError if an existing file has other columns (it came from another version of the script).
    """
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with open(path, newline="") as fh:
            found = next(csv.reader(fh), [])
        if list(found) != list(columns):
            from fedfms_secure.errors import ConfigError

            raise ConfigError(
                f"{path} has columns {found}, this script writes {list(columns)}: move the old file away "
                "(or pass another --out) to start a new grid"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="raise")
        if not exists:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        fh.flush()
        os.fsync(fh.fileno())


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    if value is None:
        return ""
    return value
