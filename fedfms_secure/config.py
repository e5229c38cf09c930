"""Typed, validated configuration of the daemons, loaded once at the edge.

One declaration per setting: each field of :class:`ServerConfig` and :class:`ClientConfig` is
declared with :func:`setting` (its help text, choices, flag aliases), and from that field come
the command-line flag (``learning_rate`` -> ``--learning-rate``; a boolean ``he`` ->
``--he/--no-he``), the TOML key (``learning_rate = 3e-3``, at top level) and the attribute.
:func:`add_config_options` generates the argparse options; :func:`flag_overrides` maps parsed
flags back to fields by name.

Precedence: built-in defaults < ``--config FILE.toml`` < command-line flags.

This module imports no torch (the server process must not pay for it): the checks that need the
data subsystem import it lazily, and only the site's checks do.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

from fedfms_secure.device import DEVICE_HELP, check_device_spec
from fedfms_secure.errors import ConfigError

# Adam's learning rate for a federated round (the server's plan) and for the baselines. At 1e-2
# the averaged no-DP model fell to (nearly) empty predictions, Dice <= 0.05, after some round in
# all 6 runs of benchmarks/results/ckks_vs_plain.md, and the DP demo (epsilon 8) ended at 0.582; at
# 3e-3 no round collapsed (seed 0: no DP 0.743 plaintext, 0.751 CKKS) and the DP demo reached 0.615.
FEDERATED_LEARNING_RATE = 3e-3

MODES = ("fedmsa", "fedsam")
SCHEMES = ("ckks", "plain")
ACCOUNTANTS = ("rdp", "prv")
# the model registry's names, kept here torch-free (a test checks they match fedfms_secure.model)
PRESETS = ("tiny", "vit_b", "vit_l", "vit_h")

LABELS_HELP = ('label map: "1,2" merges those values into the foreground, \'{"1": 1, "2": 1, "3": 2}\' maps '
               "values (or names from dataset.json) to up to 4 classes, a .json file holds such a map")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[Any] | None = None,
            aliases: Sequence[str] = (), metavar: str | None = None, kind: type | None = None,
            shown: str | None = None) -> Any:
    """A config field that is also a flag and a TOML key of the same name.

    ``help`` is the flag's help text (the default is appended), ``choices`` its allowed values,
    ``aliases`` extra flag spellings (same destination), ``kind`` the argparse type where the
    annotation alone does not say it, ``shown`` the default as the help text shows it.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases),
            "metavar": metavar, "kind": kind, "shown": shown}
    return dataclasses.field(default=default, metadata={"setting": meta})


@dataclass(frozen=True)
class ServerConfig:
    """What the coordinator needs; the plan part is sent to every site when it joins."""

    keys: Path = setting(help="server bundle from `keys export server`", metavar="DIR")
    state: Path = setting(help="folder for the server's state", metavar="DIR")
    address: str = setting("127.0.0.1:50051", "HOST:PORT to listen on (port 0 picks a free one)")
    insecure: bool = setting(False, "serve without TLS (local experiments only)")
    rounds: int = setting(3, "federated rounds of the run")
    mode: str = setting("fedmsa", "fedmsa trains adapters and the mask decoder; fedsam the whole model",
                        choices=MODES)
    preset: str = setting("tiny", "model preset", choices=PRESETS)
    image_size: int | None = setting(None, "side of the model's input in pixels, a multiple of the preset's patch "
                                           "side (16; tiny: 8): every site builds its model at this size",
                                     shown="the preset's: 1024, tiny 64", metavar="PX")
    seed: int = setting(0, "seed of the model's initialisation")
    # DP-SGD needs large expected batches and few, large steps: on the demo's ~100 slices a site
    # samples about a third of its slices per step (see README, "What the demo shows").
    local_epochs: int = setting(5, "epochs each site trains per round")
    batch_size: int = setting(32, "expected records (patients; slices with privacy_unit slice) per step of a site, "
                                  "capped at its training records; with DP the sample rate is this over the records")
    learning_rate: float = setting(FEDERATED_LEARNING_RATE, "the sites' Adam learning rate (--lr is an alias)",
                                   aliases=("--lr",))
    he: bool = setting(True, "sum CKKS ciphertexts; --no-he sums plaintext updates (a baseline, not private)")
    pretrained: bool = setting(True, "start from the preset's shipped pretrained weights; --no-pretrained: "
                                     "the seeded initialisation")
    num_classes: int = setting(1, "foreground classes of the model: every site's --labels must map to this many")
    exit_when_done: bool = setting(False, "exit once every round is done")
    round_deadline: float | None = setting(None, "seconds a phase (commit, then upload) waits before going on "
                                                 "with --min-sites sites", shown="wait for all sites")
    min_sites: int | None = setting(None, "quorum at the deadline", shown="1 when a deadline is set")
    linger: float = setting(120.0, "seconds the server waits, once done, for every site to fetch the final "
                                   "state and report")
    passphrase_file: Path | None = setting(None, "file whose first line is the passphrase of the bundle's "
                                                 "encrypted private keys", metavar="FILE")
    log_file: Path | None = setting(None, "also append the log to FILE", metavar="FILE", shown="stderr only")

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds must be at least 1")
        _require(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        _require(self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        _require(self.seed >= 0, "seed must be >= 0")
        from fedfms_secure.server.plan_sizes import check_image_size  # torch-free

        check_image_size(self.preset, self.image_size)
        _require(self.local_epochs >= 1, "local_epochs must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be positive")
        from fedfms_secure.data.labels import MAX_CLASSES  # numpy only (fedfms_secure.data loads lazily)

        _require(isinstance(self.num_classes, int) and 1 <= self.num_classes <= MAX_CLASSES,
                 f"num_classes must be 1..{MAX_CLASSES} (SAM's mask decoder has one mask token per class), "
                 f"not {self.num_classes!r}")
        check_address(self.address, flag="--address", listen=True)
        _require(self.round_deadline is None or self.round_deadline > 0, "round_deadline must be positive")
        _require(self.min_sites is None or self.min_sites >= 1, "min_sites must be at least 1")
        _require(self.linger >= 0, "linger must be >= 0 seconds")

    @property
    def scheme(self) -> str:
        return "ckks" if self.he else "plain"


@dataclass(frozen=True)
class ClientConfig:
    """What a site needs: its key bundle, its private data and its own privacy budget."""

    keys: Path = setting(help="client bundle from `keys export client NAME`", metavar="DIR")
    data: Path = setting(help="the site's folder: imagesTr/, labelsTr/", metavar="DIR")
    state: Path = setting(help="folder for the site's state: privacy ledger, split", metavar="DIR")
    server: str = setting("127.0.0.1:50051", "the coordinator's HOST:PORT")
    insecure: bool = setting(False, "connect without TLS (local experiments only)")
    site: str | None = setting(None, "site name, only with --insecure (otherwise the certificate's)")
    device: str = setting("auto", DEVICE_HELP)
    epsilon: float = setting(8.0, "target epsilon over the whole run (inf: no DP)")
    delta: float | None = setting(None, "target delta", shown="min(1e-5, 1/(10 n)) for n training records (patients)")
    max_grad_norm: float = setting(1.0, "DP-SGD clipping bound of one patient's gradient")
    accountant: str = setting("rdp", "privacy accountant", choices=ACCOUNTANTS)
    privacy_unit: str = setting("patient", "what one DP record is: a patient (a case: one volume, or the 2-D files "
                                           "of one patient) or a slice (per-slice epsilon: does not protect "
                                           "patients)", choices=("patient", "slice"))
    slices_per_patient: int = setting(1, "patient-level DP: slices of a sampled patient whose gradients are "
                                         "averaged before clipping (still one clipped gradient per patient)",
                                      metavar="M")
    patient_pattern: str | None = setting(None, "regular expression giving a 2-D file's patient from its name "
                                                "(group 'patient' or the first group), e.g. '^(\\w+?)_'",
                                          metavar="REGEX", shown="dataset.json's patient key, else one file each")
    save_updates: bool = setting(False, "keep each round's delta, weight and decrypted aggregate in STATE/updates")
    # how the site folder is read (see fedfms_secure.data)
    labels: str | None = setting(None, LABELS_HELP, shown="every non-zero value is foreground")
    axis: int = setting(2, "axis of the stored voxel array that 3-D volumes are sliced along", choices=(0, 1, 2))
    clip_percentiles: tuple[float, float] | str = setting(
        (0.5, 99.5), "intensity percentiles clipped to before scaling to [0, 1]", metavar="LOW,HIGH", kind=str,
        shown="0.5,99.5")
    keep_empty_every: int = setting(5, "keep every K-th slice without foreground (as FedFMS; 0 drops them)",
                                    metavar="K")
    skip_bad: bool = setting(False, "skip (and log) corrupt or mismatched pairs instead of stopping")
    cache: Path | None = setting(None, "keep preprocessed slices in DIR (a changed file is re-read)",
                                 metavar="DIR", shown="STATE/cache")
    connect_timeout: float = setting(60.0, "seconds to wait for the server at start-up (the site says once that it "
                                           "waits, then gives up with what to check)")
    round_timeout: float = setting(1800.0, "seconds to wait for a round's next phase (other sites, the key)")
    call_timeout: float = setting(600.0, "deadline of one RPC in seconds, streams included "
                                         "(a whole FedSAM upload is one call)")
    reconnect_timeout: float = setting(300.0, "seconds to keep retrying, with backoff, while the server is "
                                              "unreachable (e.g. restarting)")
    passphrase_file: Path | None = setting(None, "file whose first line is the passphrase of the bundle's "
                                                 "encrypted private keys", metavar="FILE")
    log_file: Path | None = setting(None, "also append the log to FILE", metavar="FILE", shown="stderr only")

    def __post_init__(self) -> None:
        _require(self.epsilon > 0, "epsilon must be positive (use inf to train without DP)")
        _require(self.delta is None or 0 < self.delta < 1, "delta must be in (0, 1)")
        _require(self.max_grad_norm > 0, "max_grad_norm must be positive")
        _require(self.accountant in ACCOUNTANTS, "accountant must be rdp or prv")
        _require(self.privacy_unit in ("patient", "slice"), "privacy_unit must be patient or slice")
        _require(self.slices_per_patient >= 1, "slices_per_patient must be at least 1")
        _require(self.slices_per_patient == 1 or self.privacy_unit == "patient",
                 "slices_per_patient applies to patient-level DP only (privacy_unit patient)")
        check_address(self.server, flag="--server", listen=False)
        object.__setattr__(self, "device", check_device_spec(self.device))
        _require(self.site is None or self.insecure, "site is only set with --insecure; "
                 "otherwise the name comes from the site's certificate")
        _require(self.axis in (0, 1, 2), "axis must be 0, 1 or 2")
        _require(self.keep_empty_every >= 0, "keep_empty_every must be >= 0")
        for name in ("connect_timeout", "round_timeout", "call_timeout", "reconnect_timeout"):
            _require(getattr(self, name) > 0, f"{name} must be a positive number of seconds")
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


# --- flags -----------------------------------------------------------------------------------------
def flag_of(name: str) -> str:
    """The command-line flag of a field: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, names: Iterable[str] | None = None,
                       defaults: Mapping[str, Any] | None = None, shown: Mapping[str, str] | None = None) -> None:
    """Add one option per field of ``cls`` (or of ``names``) to ``parser``, generated from the field.

    Without ``defaults`` every option defaults to None, meaning "not given" (a config file or the
    field's default fills it); the help text still shows the field's default. ``defaults`` gives
    the parser real defaults (by field name), as a command without a config file needs. ``shown``
    gives the help's default text where the caller resolves a None default itself.
    """
    by_name = {f.name: f for f in fields(cls)}
    for name in (names if names is not None else by_name):
        f = by_name[name]
        meta = f.metadata["setting"]
        given = defaults is not None and name in defaults
        default = defaults[name] if given else f.default
        if shown is not None and name in shown:
            text = shown[name]
        elif given and default is not None:
            text = _shown(default)
        elif f.default is dataclasses.MISSING:
            text = "none, required as a flag or a key of the --config file"
        else:  # None given: "as the field's default" (e.g. the demo's learning rate is the server's plan)
            text = meta["shown"] if meta["shown"] is not None else _shown(f.default)
        kwargs: dict[str, Any] = {"dest": name, "default": default if given else None,
                                  "help": f"{meta['help']} (default: {text})".replace("%", "%%")}
        if _base_type(f) == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["kind"] or _ARG_TYPES[_base_type(f)]
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_of(name), *meta["aliases"], **kwargs)


def flag_overrides(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags of ``cls``'s options by field name (None: the flag was not given)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def setting_help(cls: type, name: str) -> str:
    """The help text of one field (without its default)."""
    return {f.name: f for f in fields(cls)}[name].metadata["setting"]["help"]


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_ARG_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "Path": Path}


def _base_type(f: dataclasses.Field) -> str:
    """``"float | None"`` -> ``"float"``; the first alternative of a union."""
    return str(f.type).replace(" | None", "").split(" | ")[0].split("[")[0]


# --- loading -------------------------------------------------------------------------------------
def load_config(cls: type[C], file: Path | None, overrides: Mapping[str, Any]) -> C:
    """Build ``cls`` from a TOML file (optional) and flag overrides (``None`` means not given)."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        for name, value in _read_toml(file, cls).items():
            _check_type(name, value, known[name], where=f"config file {file}: key {name}")
            values[name] = value
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in known:
            raise ConfigError(f"{name} is not a setting of {cls.__name__}; known: {', '.join(known)}")
        _check_type(name, value, known[name], where=flag_of(name))
        values[name] = value
    missing = [n for n, f in known.items() if _required(f) and n not in values]
    if missing:
        raise ConfigError(
            f"missing {', '.join(flag_of(m) for m in missing)}: "
            "give it as a flag or in the --config file"
        )
    for name, value in list(values.items()):
        if "Path" in str(known[name].type) and value is not None:
            values[name] = Path(value).expanduser()
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
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"config file {file}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}"
        )
    return data


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "Path": (str, Path)}


def _check_type(name: str, value: Any, f: dataclasses.Field, *, where: str) -> None:
    if name == "clip_percentiles":  # a "LOW,HIGH" string or a pair: check_percentiles says what is wrong
        return
    expected = _TYPES.get(_base_type(f))
    if expected is None or value is None:
        return
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        wanted = "a path (a string)" if _base_type(f) == "Path" else _base_type(f)
        raise ConfigError(f"{where} must be {wanted}, not {type(value).__name__} {value!r}")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def check_address(address: str, *, flag: str, listen: bool) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) split and checked: a host, and a port 1..65535 (0 too where
    ``listen``: the system picks a free one). ConfigError saying what to write otherwise."""
    example = "0.0.0.0:50051 (every interface) or 127.0.0.1:50051" if listen else "fl.example.org:50051"
    host, sep, port_text = str(address).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{flag} {address!r} is not HOST:PORT: write e.g. {example}")
    port = int(port_text)
    low = 0 if listen else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{flag} {address!r}: the port must be {low}..65535"
                          + (" (0 picks a free one)" if listen else "") + f", not {port}: write e.g. {example}")
    return host, port


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
