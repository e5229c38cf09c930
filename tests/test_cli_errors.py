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
