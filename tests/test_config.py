"""The daemons' settings: one declaration gives the field, the flag and the TOML key."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedfms_secure.cli import _parser
from fedfms_secure.config import ClientConfig, ServerConfig, flag_of, flag_overrides, load_config
from fedfms_secure.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# a value different from the default for every field
SERVER_VALUES: dict[str, Any] = {
    "keys": "k", "state": "s", "address": "0.0.0.0:6000", "insecure": True, "rounds": 7, "mode": "fedsam",
    "preset": "vit_b", "image_size": 256, "seed": 3, "local_epochs": 2, "batch_size": 8, "learning_rate": 0.01, "he": False,
    "pretrained": False, "num_classes": 2, "exit_when_done": True, "round_deadline": 30.5, "min_sites": 2,
    "linger": 5.0, "passphrase_file": "pw.txt", "log_file": "server.log",
}
CLIENT_VALUES: dict[str, Any] = {
    "keys": "k", "data": "d", "state": "s", "server": "host:1", "insecure": True, "site": "a", "device": "cpu", "epsilon": 4.0,
    "delta": 1e-6, "max_grad_norm": 0.5, "accountant": "prv", "privacy_unit": "slice",
    "slices_per_patient": 1, "patient_pattern": "^(\\w+?)_", "save_updates": True, "labels": "1,2", "axis": 0,
    "clip_percentiles": "1,99", "keep_empty_every": 0, "skip_bad": True, "cache": "c", "connect_timeout": 5.0,
    "round_timeout": 6.0, "call_timeout": 7.0, "reconnect_timeout": 8.0, "passphrase_file": "p",
    "log_file": "site.log",
}
CASES = [("server", ServerConfig, SERVER_VALUES), ("client", ClientConfig, CLIENT_VALUES)]


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _toml(values: dict[str, Any]) -> str:
    def literal(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    return "".join(f"{k} = {literal(v)}\n" for k, v in values.items())


def _flags(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(flag_of(name) if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag_of(name), str(value)]
    return argv


@pytest.mark.parametrize(("command", "cls", "values"), CASES)
def test_every_field_has_a_flag_and_every_flag_a_field(command: str, cls: type, values: dict) -> None:
    dests = {a.dest for a in _subparser(command)._actions if a.dest not in ("help", "config")}
    assert dests == {f.name for f in dataclasses.fields(cls)}
    assert set(values) == dests  # the tables below cover every field
    for action in _subparser(command)._actions:
        if action.dest not in ("help", "config"):
            assert flag_of(action.dest) in action.option_strings


@pytest.mark.parametrize(("command", "cls", "values"), CASES)
def test_a_toml_with_every_key_loads_as_the_same_flags(command: str, cls: type, values: dict, tmp_path: Path) -> None:
    defaults = load_config(cls, None, {k: values[k] for k in ("keys", "state", "data") if k in values})
    file = tmp_path / f"{command}.toml"
    file.write_text(_toml(values))
    from_toml = load_config(cls, file, {})
    args = _parser().parse_args([command, *_flags(values)])
    from_flags = load_config(cls, None, flag_overrides(cls, args))
    assert from_toml == from_flags
    for f in dataclasses.fields(cls):  # every value is really set (none is the default)
        # slices_per_patient > 1 needs privacy_unit patient, the default: set in its own test below
        if f.name not in ("keys", "state", "data", "slices_per_patient"):
            assert getattr(from_toml, f.name) != getattr(defaults, f.name), f.name


def test_flags_override_the_file_and_booleans_turn_both_ways(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text('keys = "k"\nstate = "s"\nhe = false\nrounds = 4\n')
    args = _parser().parse_args(["server", "--config", str(file), "--he", "--lr", "0.02"])
    config = load_config(ServerConfig, args.config, flag_overrides(ServerConfig, args))
    assert (config.he, config.rounds, config.learning_rate) == (True, 4, 0.02)
    args = _parser().parse_args(["server", "--config", str(file), "--learning-rate", "0.05"])
    assert load_config(ServerConfig, args.config, flag_overrides(ServerConfig, args)).learning_rate == 0.05


def test_a_toml_type_error_names_the_file_and_the_key(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text('keys = "k"\nstate = "s"\nrounds = "three"\n')
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, file, {})
    assert str(file) in str(info.value) and "key rounds" in str(info.value) and "int" in str(info.value)
    file.write_text('keys = "k"\nstate = "s"\nhe = 1\n')
    with pytest.raises(ConfigError, match="key he must be bool"):
        load_config(ServerConfig, file, {})


def test_an_unknown_key_names_the_file_and_lists_the_valid_keys(tmp_path: Path) -> None:
    file = tmp_path / "site.toml"
    file.write_text('keys = "k"\ndata = "d"\nstate = "s"\nlr = 0.1\n')
    with pytest.raises(ConfigError) as info:
        load_config(ClientConfig, file, {})
    message = str(info.value)
    assert str(file) in message and "unknown key(s) lr" in message
    assert all(f.name in message for f in dataclasses.fields(ClientConfig))


def test_the_config_and_the_cli_import_no_torch() -> None:
    code = ("import sys\nimport fedfms_secure.cli, fedfms_secure.config\n"
            "from fedfms_secure.config import ServerConfig\n"
            "ServerConfig(keys='k', state='s', num_classes=2)\n"
            "fedfms_secure.cli._parser()\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(("name", "cls"), [("server.toml", ServerConfig), ("site.toml", ClientConfig)])
def test_the_examples_hold_every_key_and_load(name: str, cls: type) -> None:
    import re
    import tomllib

    file = REPO / "examples" / name
    text = file.read_text()
    # optional keys (no TOML value means "not set") appear commented out, ready to uncomment
    commented = set(re.findall(r"^# (\w+) = ", text, re.M))
    assert set(tomllib.loads(text)) | commented == {f.name for f in dataclasses.fields(cls)}
    for line in text.splitlines():
        if re.match(r"^# \w+ = ", line):
            tomllib.loads(line[2:].split("  #")[0])  # valid TOML once uncommented
    config = load_config(cls, file, {})
    assert isinstance(config, cls)


def test_the_demo_flags_default_to_the_demo_options_and_reach_them_by_name() -> None:
    from fedfms_secure.cli import demo_options
    from fedfms_secure.demo import DemoOptions

    assert demo_options(_parser().parse_args(["demo"])) == DemoOptions()
    options = demo_options(_parser().parse_args(
        ["demo", "--no-he", "--lr", "0.01", "--skip-bad", "--clip-percentiles", "1,99", "--rounds", "2",
         "--epsilon", "inf", "--no-pretrained", "--mode", "fedsam"]))
    assert (options.he, options.learning_rate, options.skip_bad, options.clip_percentiles) == (False, 0.01, True,
                                                                                            (1.0, 99.0))
    assert (options.rounds, options.epsilon, options.pretrained, options.mode) == (2, float("inf"), False, "fedsam")


def test_the_torch_free_preset_and_mode_names_match_the_model_registry() -> None:
    from fedfms_secure.config import MODES, PRESETS
    from fedfms_secure.model.modes import MODES as MODEL_MODES
    from fedfms_secure.model.registry import PRESETS as REGISTRY

    assert set(PRESETS) == set(REGISTRY)
    assert set(MODES) == set(MODEL_MODES)


def test_image_size_must_fit_the_presets_patch() -> None:
    assert ServerConfig(keys=Path("k"), state=Path("s"), preset="vit_b", image_size=128).image_size == 128
    with pytest.raises(ConfigError, match="multiple of preset 'vit_b'.*patch side 16; use e.g. 128"):
        ServerConfig(keys=Path("k"), state=Path("s"), preset="vit_b", image_size=130)
    with pytest.raises(ConfigError, match="patch side 8"):
        load_config(ServerConfig, None, {"keys": "k", "state": "s", "image_size": 4})


def test_device_is_checked_and_normalised_without_a_gpu() -> None:
    base = {"keys": "k", "data": "d", "state": "s"}
    assert load_config(ClientConfig, None, {**base, "device": " CUDA:1 "}).device == "cuda:1"  # checked on use
    assert load_config(ClientConfig, None, base).device == "auto"
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda, cuda:N"):
        load_config(ClientConfig, None, {**base, "device": "gpu"})


def test_slices_per_patient_needs_patient_level_dp() -> None:
    base = {"keys": Path("k"), "data": Path("d"), "state": Path("s")}
    assert ClientConfig(**base, slices_per_patient=4).slices_per_patient == 4
    args = _parser().parse_args(["client", "--slices-per-patient", "3"])
    assert load_config(ClientConfig, None, {**flag_overrides(ClientConfig, args), **base}).slices_per_patient == 3
    with pytest.raises(ConfigError, match="patient-level DP only"):
        ClientConfig(**base, slices_per_patient=4, privacy_unit="slice")
    with pytest.raises(ConfigError, match="at least 1"):
        ClientConfig(**base, slices_per_patient=0)
