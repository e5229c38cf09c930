"""Typed, validated configuration of the daemons, loaded once at the edge.

Precedence: built-in defaults < ``--config FILE.toml`` < command-line flags. A TOML file holds the
same keys as the flags, with underscores (``round_timeout``, ``max_grad_norm``, ...), at top level.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

from fedfms_secure.errors import ConfigError

# Adam's learning rate for a federated round (the server's plan) and for the baselines. At 1e-2
# the averaged no-DP model fell to (nearly) empty predictions, Dice <= 0.05, after some round in
# all 6 runs of benchmarks/results/ckks_vs_plain.md, and the DP demo (epsilon 8) ended at 0.582; at
# 3e-3 no round collapsed (seed 0: no DP 0.743 plaintext, 0.751 CKKS) and the DP demo reached 0.615.
FEDERATED_LEARNING_RATE = 3e-3

MODES = ("fedmsa", "fedsam")
SCHEMES = ("ckks", "plain")


@dataclass(frozen=True)
class ServerConfig:
    """What the coordinator needs; the plan part is sent to every site when it joins."""

    keys: Path
    state: Path
    address: str = "127.0.0.1:50051"
    insecure: bool = False
    rounds: int = 3
    mode: str = "fedmsa"
    preset: str = "tiny"
    seed: int = 0
    # DP-SGD needs large expected batches and few, large steps: on the demo's ~100 slices a site
    # samples about a third of its slices per step (see README, "What the demo shows").
    local_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = FEDERATED_LEARNING_RATE
    he: bool = True
    # start from the preset's shipped pretrained weights (tiny); False: the seeded initialisation
    pretrained: bool = True
    # foreground classes of the federation's model: every site's --labels must map to this many
    num_classes: int = 1
    exit_when_done: bool = False
    # seconds a phase (commit, then upload) waits before going on with min_sites sites; None: wait for all
    round_deadline: float | None = None
    # quorum at the deadline (default 1 when a deadline is set)
    min_sites: int | None = None
    # Seconds the server waits, once done, for every site to fetch the final state and report.
    linger: float = 120.0
    # file whose first line is the passphrase of the bundle's encrypted private keys
    passphrase_file: Path | None = None

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds must be at least 1")
        _require(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        _require(self.local_epochs >= 1, "local_epochs must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.learning_rate > 0, "learning_rate must be positive")
        from fedfms_secure.data.labels import MAX_CLASSES

        _require(isinstance(self.num_classes, int) and 1 <= self.num_classes <= MAX_CLASSES,
                 f"num_classes must be 1..{MAX_CLASSES} (SAM's mask decoder has one mask token per class), "
                 f"not {self.num_classes!r}")
        _require(":" in self.address, f"address must be HOST:PORT, not {self.address!r}")
        _require(self.round_deadline is None or self.round_deadline > 0, "round_deadline must be positive")
        _require(self.min_sites is None or self.min_sites >= 1, "min_sites must be at least 1")

    @property
    def scheme(self) -> str:
        return "ckks" if self.he else "plain"


@dataclass(frozen=True)
class ClientConfig:
    """What a site needs: its key bundle, its private data and its own privacy budget."""

    keys: Path
    data: Path
    state: Path
    server: str = "127.0.0.1:50051"
    insecure: bool = False
    # Only with --insecure: the site name that a certificate would otherwise carry.
    site: str | None = None
    epsilon: float = 8.0
    # None: min(1e-5, 1/(10 n)) for the site's n training patients (see privacy/budget.py)
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    # what one DP record is: "patient" (a case; default) or "slice" (does not protect patients)
    privacy_unit: str = "patient"
    # regular expression giving a 2-D file's patient from its name (None: dataset.json, else one file each)
    patient_pattern: str | None = None
    # Keep each round's delta, weight and decrypted aggregate in STATE/updates (for audits/tests).
    save_updates: bool = False
    # how the site folder is read (see fedfms_secure.data): label map spec ("1,2", a JSON object or
    # a .json file; None: every non-zero value is foreground), slicing axis, intensity clip
    # percentiles, empty slices kept (one in k), skip bad pairs instead of stopping, and the slice
    # cache folder (None: STATE/cache)
    labels: str | None = None
    axis: int = 2
    clip_percentiles: tuple[float, float] | str = (0.5, 99.5)
    keep_empty_every: int = 5
    skip_bad: bool = False
    cache: Path | None = None
    connect_timeout: float = 60.0
    round_timeout: float = 1800.0
    # deadline of one RPC, streams included (a whole FedSAM upload is one call)
    call_timeout: float = 600.0
    # while the server is unreachable (e.g. restarting), keep retrying with backoff this long
    reconnect_timeout: float = 300.0
    # file whose first line is the passphrase of the bundle's encrypted private keys
    passphrase_file: Path | None = None

    def __post_init__(self) -> None:
        _require(self.epsilon > 0, "epsilon must be positive (use inf to train without DP)")
        _require(self.delta is None or 0 < self.delta < 1, "delta must be in (0, 1)")
        _require(self.max_grad_norm > 0, "max_grad_norm must be positive")
        _require(self.accountant in ("rdp", "prv"), "accountant must be rdp or prv")
        _require(self.privacy_unit in ("patient", "slice"), "privacy_unit must be patient or slice")
        _require(":" in self.server, f"server must be HOST:PORT, not {self.server!r}")
        _require(self.site is None or self.insecure, "site is only set with --insecure; "
                 "otherwise the name comes from the site's certificate")
        _require(self.axis in (0, 1, 2), "axis must be 0, 1 or 2")
        _require(self.keep_empty_every >= 0, "keep_empty_every must be >= 0")
        from fedfms_secure.data.labels import num_classes_of
        from fedfms_secure.data.preprocess import check_percentiles

        object.__setattr__(self, "clip_percentiles", check_percentiles(self.clip_percentiles))
        num_classes_of(self.labels)  # a malformed label map fails here, with what to write instead
        if self.cache is not None:
            object.__setattr__(self, "cache", Path(self.cache).expanduser())

    @property
    def dp(self) -> bool:
        return not math.isinf(self.epsilon)


C = TypeVar("C", ServerConfig, ClientConfig)


def load_config(cls: type[C], file: Path | None, overrides: Mapping[str, Any]) -> C:
    """Build ``cls`` from a TOML file (optional) and flag overrides (``None`` means not given)."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(_read_toml(file, cls))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in fields(cls)}
    missing = [n for n, f in known.items() if _required(f) and n not in values]
    if missing:
        raise ConfigError(
            f"missing {', '.join('--' + m.replace('_', '-') for m in missing)}: "
            "give it as a flag or in the --config file"
        )
    for name in ("keys", "state", "data", "passphrase_file"):
        if name in values and name in known:
            if not isinstance(values[name], (str, Path)):
                raise ConfigError(f"{name} must be a path, not {values[name]!r}")
            values[name] = Path(values[name]).expanduser()
    for name, value in values.items():
        _check_type(name, value, known[name])
    return cls(**values)


def _read_toml(file: Path, cls: type) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(file).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist: check the path given to --config")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {file} ({exc.strerror}): give --config a TOML file")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"config file {file}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    return data


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "str | None": (str,),
          "float | None": (int, float), "int | None": (int,)}


def _check_type(name: str, value: Any, f: dataclasses.Field) -> None:
    expected = _TYPES.get(str(f.type))
    if expected is None or value is None:
        return
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        raise ConfigError(
            f"{name} must be {str(f.type).replace(' | None', '')}, not {type(value).__name__} {value!r}"
        )


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
