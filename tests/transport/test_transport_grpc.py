"""The servicer over a real gRPC server on 127.0.0.1 with mutual TLS."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.errors import FederationError
from fedfms_secure.protocol import Chunk
from fedfms_secure.transport.client import FederationClient

from federation_kit import provision_sites, running_server, site_client


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    provision_sites(root, ["a", "b"], federation="t", he_dealer=True)
    # a second federation whose site certificate the first server must refuse
    other = init_federation(root / "other", federation="o", server_host="localhost", clients=["a"], he_dealer=True)
    export_bundle("client", "a", other, root / "foreign_a")
    with running_server(root / "server", root / "state", rounds=1) as address:
        yield root, address


def test_site_identity_comes_from_its_certificate(federation):
    root, address = federation
    b = load_bundle(root / "a", role="client")
    with site_client(address, root / "a", timeout=10) as client:
        joined = client.join(b.fingerprint, "test")
        assert joined.site == "a"
        assert joined.plan.rounds == 1 and joined.plan.scheme == "ckks" and joined.plan.pretrained
        assert client.bytes_up > 0 and client.bytes_down > 0


def test_a_certificate_from_another_ca_is_refused(federation):
    root, address = federation
    with site_client(address, root / "a", timeout=10) as good:  # the server is up and answers a genuine site
        assert good.status().federation == "t"
    b = load_bundle(root / "foreign_a", role="client")
    client = FederationClient(address, ca_pem=load_bundle(root / "a", role="client").ca_pem, cert_pem=b.cert_pem,
                              key_pem=b.key_pem, server_name="localhost", call_timeout=5)
    with client, pytest.raises(FederationError):
        client.status()


def test_plaintext_connection_is_refused(federation):
    root, address = federation
    with site_client(address, root / "a", timeout=10) as good:
        assert good.status().round == 0
    with FederationClient(address, insecure=True, site="a", call_timeout=5) as client, pytest.raises(FederationError):
        client.status()


def test_wrong_fingerprint_and_bad_stream_get_deliberate_codes(federation):
    root, address = federation
    b = load_bundle(root / "b", role="client")
    codec = make_site_codec("ckks", b.context(), b.fingerprint)
    with site_client(address, root / "b", timeout=10) as client:
        with pytest.raises(FederationError, match="context mismatch") as exc:
            client.join("deadbeef", "test")
        assert exc.value.code == "invalid_argument"
        with pytest.raises(FederationError, match="commit") as exc:
            payload = codec.encrypt_vector(np.zeros(4))[0]
            client.upload(lambda: [Chunk(0, 0, 1, 4, b.fingerprint, payload, 4)])
        assert exc.value.code == "failed_precondition"
        with pytest.raises(FederationError, match="empty upload") as exc:
            client.upload(lambda: [])
        assert exc.value.code == "invalid_argument"


def test_an_oversized_message_is_refused(federation):
    root, address = federation
    b = load_bundle(root / "a", role="client")
    with site_client(address, root / "a", timeout=10) as client:
        with pytest.raises(FederationError) as exc:
            client.commit_weight(0, b.fingerprint, b"x" * (5 * 1024 * 1024))
        assert exc.value.code == "resource_exhausted"


def test_health_service_reports_serving(federation):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    root, address = federation
    b = load_bundle(root / "a", role="client")
    creds = grpc.ssl_channel_credentials(b.ca_pem, b.key_pem, b.cert_pem)
    with grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(federation):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    root, address = federation
    b = load_bundle(root / "a", role="client")
    creds = grpc.ssl_channel_credentials(b.ca_pem, b.key_pem, b.cert_pem)
    with grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"fedfms_secure.v1.Federation", "grpc.health.v1.Health"} <= names


def test_status_command_shows_the_round_and_the_sites(federation, capsys):
    from fedfms_secure.cli import main

    root, address = federation
    assert main(["status", "--server", address, "--keys", str(root / "a"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["federation"] == "t" and printed["total_rounds"] == 1
    assert [s["name"] for s in printed["sites"]] == ["a", "b"]
    assert main(["status", "--server", address, "--keys", str(root / "a")]) == 0
    table = capsys.readouterr().out
    assert "round 1 of 1" in table and "committed" in table
    assert main(["status", "--server", address, "--keys", str(root / "server")]) == 1
    assert "keys export client" in capsys.readouterr().err


def test_the_plan_survives_the_wire():
    from fedfms_secure.protocol import Plan
    from fedfms_secure.transport import serde

    for pretrained, classes, size in ((True, 1, 0), (False, 3, 256)):
        plan = Plan("f", 3, "fedsam", "tiny", 7, 2, 16, 3e-3, "plain", pretrained=pretrained, num_classes=classes,
                    image_size=size)
        assert serde.plan_from_proto(serde.plan_to_proto(plan)) == plan
    # a plan from a server older than the fields (0 on the wire) fixes no class count and keeps the
    # preset's input size
    legacy = serde.plan_to_proto(plan)
    legacy.ClearField("num_classes")
    legacy.ClearField("image_size")
    assert serde.plan_from_proto(legacy).num_classes == 0
    assert serde.plan_from_proto(legacy).image_size == 0
