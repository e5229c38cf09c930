"""What a new user sees when a step goes wrong: a clear message and a non-zero exit."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedfms_secure.cli import main
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.data import synth_federation


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    provision = init_federation(root / "prov", federation="t", server_host="localhost", clients=["site_1"])
    export_bundle("server", None, provision, root / "server")
    export_bundle("client", "site_1", provision, root / "site_1")
    data = synth_federation(root / "data", sites=1, seed=0)[0]
    return root, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_bundle(tmp_path, capsys):
    code = main(["client", "--keys", str(tmp_path / "nope"), "--server", "127.0.0.1:1",
                 "--data", str(tmp_path), "--state", str(tmp_path / "s")])
    assert code == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "keys export" in err


def test_server_refuses_a_bundle_that_can_decrypt(provisioned, tmp_path, capsys):
    root, _ = provisioned
    code = main(["server", "--keys", str(root / "site_1"), "--state", str(tmp_path), "--address", "127.0.0.1:0"])
    assert code == 1
    assert "keys export server" in capsys.readouterr().err


def test_missing_data_folder(provisioned, tmp_path, capsys):
    root, _ = provisioned
    code = main(["client", "--keys", str(root / "site_1"), "--server", "127.0.0.1:1",
                 "--data", str(tmp_path / "missing"), "--state", str(tmp_path / "s")])
    assert code == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_server_not_reachable(provisioned, tmp_path, capsys):
    root, data = provisioned
    code = main(["client", "--keys", str(root / "site_1"), "--server", f"127.0.0.1:{_free_port()}",
                 "--data", str(data), "--state", str(tmp_path / "s"), "--connect-timeout", "2"])
    assert code == 1
    assert "cannot reach the server" in capsys.readouterr().err


def test_config_file_and_flag_override(tmp_path):
    from fedfms_secure.config import ServerConfig, load_config
    from fedfms_secure.errors import ConfigError

    f = tmp_path / "server.toml"
    f.write_text('keys = "k"\nstate = "s"\nrounds = 5\nmode = "fedsam"\n')
    cfg = load_config(ServerConfig, f, {"rounds": 2, "mode": None})
    assert (cfg.rounds, cfg.mode, cfg.keys) == (2, "fedsam", Path("k"))
    f.write_text('keys = "k"\nstate = "s"\nround = 5\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ServerConfig, f, {})
    with pytest.raises(ConfigError, match="--keys"):
        load_config(ServerConfig, None, {"state": "s"})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epsilon", "-1"], "epsilon must be positive"),
        (["--epsilon", "0"], "epsilon must be positive"),
        (["--epsilon", "nan"], "epsilon must be positive"),
        (["--rounds", "0"], "rounds must be at least 1"),
        (["--clients", "0"], "--clients must be at least 1"),
        (["--local-epochs", "0"], "local_epochs must be at least 1"),
        (["--learning-rate", "0"], "learning_rate must be positive"),
        (["--lr=-1e-3"], "learning_rate must be positive"),
        (["--labels", '{"1": 2}'], "without a gap"),
        (["--clip-percentiles", "99,1"], "LOW < HIGH"),
        (["--keep-empty-every", "-1"], "keep_empty_every"),
        (["--holdout", " "], "--holdout"),
        (["--device", "gpu"], "not one of auto, cpu, cuda, cuda:N"),
        (["--preset", "vit_b", "--image-size", "100"], "patch side 16"),
    ],
)
def test_demo_refuses_bad_arguments_before_writing_or_starting_anything(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), *flags]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()  # no data written, no keys provisioned, no process started


def test_demo_refuses_a_data_folder_that_is_not_there(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_inspect_fails_for_a_site_that_cannot_be_trained_on(tmp_path, capsys):
    (tmp_path / "fed" / "no_labels" / "imagesTr").mkdir(parents=True)
    assert main(["data", "inspect", str(tmp_path / "fed")]) == 1
    captured = capsys.readouterr()
    assert "problem:" in captured.out and "labelsTr" in captured.out  # the problems are still listed
    assert "site no_labels cannot be trained on" in captured.err


def test_evaluate_refuses_per_image_without_json(tmp_path, capsys):
    code = main(["evaluate", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path), "--per-image"])
    assert code == 1
    assert "add --json" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "code"), [
    (["server", "--help"], 0),  # argparse drops the help text it cannot write
    (["privacy", "plan", "--target-epsilon", "8", "--delta", "1e-5", "--sample-rate", "0.3", "--steps", "10",
      "--json"], 141),
])
def test_a_closed_pipe_ends_quietly(argv, code):
    import subprocess
    import sys

    import os

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "fedfms_secure", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    proc.stdout.close()  # as `| head` does once it has read enough
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert proc.returncode == code


def _absent_gpu() -> tuple[str, str]:
    """A CUDA device this machine does not have, and what the error says about it."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.device_count()}", "CUDA device(s) here"
    return "cuda", "no CUDA GPU here"


def test_a_client_on_an_absent_gpu_stops_before_connecting(provisioned, tmp_path, capsys):
    root, data = provisioned
    device, message = _absent_gpu()
    code = main(["client", "--keys", str(root / "site_1"), "--server", f"127.0.0.1:{_free_port()}",
                 "--data", str(data), "--state", str(tmp_path / "s"), "--connect-timeout", "30", "--device", device])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and "cannot reach the server" not in err


@pytest.mark.parametrize("command", ["central", "local"])
def test_train_and_evaluate_on_an_absent_gpu_say_so(provisioned, tmp_path, capsys, command):
    _, data = provisioned
    device, message = _absent_gpu()
    assert main(["train", command, "--data", str(data.parent), "--epochs", "1", "--device", device]) == 1
    assert message in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--data", str(data), "--device", device]) == 1
    assert message in capsys.readouterr().err
