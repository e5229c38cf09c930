"""The server's plan carries the input size it was given (0: the preset's)."""

from __future__ import annotations

from pathlib import Path

from fedfms_secure.config import ServerConfig
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.server.daemon import build_coordinator
from fedfms_secure.transport import serde


def test_the_plan_carries_the_image_size(tmp_path: Path) -> None:
    provision = init_federation(tmp_path / "prov", federation="t", server_host="localhost", clients=["site_1"])
    export_bundle("server", None, provision, tmp_path / "server")
    sized = ServerConfig(keys=tmp_path / "server", state=tmp_path / "a", preset="tiny", mode="fedsam", image_size=32)
    coordinator, _, _ = build_coordinator(sized)
    assert coordinator.plan.image_size == 32
    assert serde.plan_from_proto(serde.plan_to_proto(coordinator.plan)).image_size == 32
    default = ServerConfig(keys=tmp_path / "server", state=tmp_path / "b", preset="tiny", mode="fedsam")
    assert build_coordinator(default)[0].plan.image_size == 0  # the sites build the preset's size
