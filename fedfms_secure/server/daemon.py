"""``fedfms-secure server``: the coordinator daemon.

Every call passes the ``RevocationInterceptor`` (``server/interceptors.py``): a certificate on the
bundle's CA-signed ``crl.pem`` is refused with ``PERMISSION_DENIED`` and the reason, from the next
call on, also while the server runs (the list is reloaded when the file changes). What the server
has seen revoked is also kept in its ``--state`` folder (``revocations.json``), so a restart from a
bundle whose ``crl.pem`` is missing or older still refuses it. A site removed by ``keys revoke``
also counts as retired, so rounds no longer wait for it.

One site cannot hold the server (``ServerLimits``): it runs at most a few calls at once, a
client stream that goes silent is cancelled, connections are recycled, and the coordinator
takes one upload per site at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedfms_secure.config import ServerConfig, check_address
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import CRL
from fedfms_secure.he.codec import make_aggregator
from fedfms_secure.keys.bundle import Bundle, load_bundle
from fedfms_secure.errors import ConfigError, FedFmsError
from fedfms_secure.logs import add_log_file
from fedfms_secure.protocol import Plan
from fedfms_secure.server.coordinator import Coordinator
from fedfms_secure.server.plan_sizes import plan_vector_length
from fedfms_secure.server.store import StateStore
from fedfms_secure.statelock import StateLock
from fedfms_secure.transport.channel import MAX_MESSAGE_BYTES, MESSAGE_OPTIONS, server_credentials
from fedfms_secure.keys.revocation import PERSISTED, RevocationList
from fedfms_secure.server.interceptors import RevocationInterceptor, SiteLimitInterceptor
from fedfms_secure.server.servicer import FederationServicer, peer_site
from fedfms_secure.v1 import federation_pb2 as pb
from fedfms_secure.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("fedfms_secure.server")


@dataclass(frozen=True)
class ServerLimits:
    """How much of the server one site may hold: worker threads, calls, idle streams, disk."""

    workers: int = 32  # gRPC worker threads
    max_concurrent_rpcs: int = 128  # beyond this, calls are refused with RESOURCE_EXHAUSTED at once
    per_site_calls: int = 4  # calls one site may run at once (it makes one at a time)
    idle_timeout: float = 60.0  # seconds a client stream may send nothing before it is cancelled
    max_connection_age: float = 1800.0  # seconds; the client reconnects transparently
    max_connection_age_grace: float = 600.0  # seconds a call running at that age may still take

    def options(self) -> list[tuple[str, int]]:
        """The gRPC server options that enforce the connection limits."""
        return [("grpc.max_connection_age_ms", int(self.max_connection_age * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace * 1000))]


def build_coordinator(config: ServerConfig) -> tuple[Coordinator, Bundle, StateStore]:
    """Loads the server bundle (refusing any that can decrypt) and builds the coordinator."""
    bundle = load_bundle(config.keys, role="server", passphrase=pki.read_passphrase(config.passphrase_file))
    if config.min_sites is not None and config.min_sites > len(bundle.clients):
        raise ConfigError(f"--min-sites {config.min_sites} is more than the federation's {len(bundle.clients)} "
                          "sites: the deadline could never be met; lower it")
    if config.he:
        # load_bundle(role="server") has refused any context that holds a secret key
        if bundle.params.packing is not None:
            bundle.params.packing.check_plan(sites=len(bundle.clients), rounds=config.rounds)
        # None with a key generated at a site (he_source "site"): the context fingerprint arrives with the
        # key epochs that `keys he-init` publishes through the coordinator
        fingerprint = bundle.fingerprint
        aggregator = make_aggregator("ckks", bundle.context(), fingerprint, params=bundle.params)
    else:
        aggregator, fingerprint = make_aggregator("plain", None), "plain"
    plan = Plan(
        federation=bundle.federation,
        rounds=config.rounds,
        mode=config.mode,
        preset=config.preset,
        seed=config.seed,
        local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        scheme=config.scheme,
        pretrained=config.pretrained,
        num_classes=config.num_classes,
        image_size=config.image_size or 0,
    )
    store = StateStore(config.state)
    length = plan_vector_length(plan.preset, plan.mode, plan.image_size or None)
    quota = round_quota(length, aggregator.chunk_values, len(bundle.clients))
    coordinator = Coordinator(plan, bundle.clients, aggregator, fingerprint, store,
                              round_deadline=config.round_deadline, min_sites=config.min_sites,
                              vector_length=length, round_quota_bytes=quota, background_close=True)
    return coordinator, bundle, store


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas: each of the many worker threads that parse ciphertexts would
    otherwise keep an arena of its own, holding freed memory that no other thread reuses (the
    same as ``MALLOC_ARENA_MAX``). Does nothing without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def round_quota(vector_length: int, chunk_values: int, sites: int) -> int:
    """Disk a round may use for uploads: each site's update twice over (an accepted one and one in
    flight), every chunk at the largest message the transport accepts."""
    chunks = math.ceil(vector_length / chunk_values)
    return 2 * sites * chunks * MAX_MESSAGE_BYTES


def serve(config: ServerConfig, stop: threading.Event | None = None, limits: ServerLimits | None = None) -> int:
    """Runs until the federation is done (with ``exit_when_done``), SIGTERM/SIGINT, or ``stop``.

    One server per ``--state`` folder (a lock, see ``statelock``) and per port (no SO_REUSEPORT)."""
    add_log_file(config.log_file)
    limit_malloc_arenas()
    check_address(config.address, flag="--address", listen=True)
    with StateLock(config.state, "server"):
        return _serve(config, stop, limits or ServerLimits())


def _serve(config: ServerConfig, stop: threading.Event | None, limits: ServerLimits) -> int:
    coordinator, bundle, store = build_coordinator(config)
    revocations = None if config.insecure else RevocationList(bundle.path / CRL, bundle.ca_pem,
                                                              persist=store.root / PERSISTED)
    interceptors: list[grpc.ServerInterceptor] = [RevocationInterceptor(revocations)] if revocations is not None else []
    interceptors.append(SiteLimitInterceptor(lambda context: peer_site(context, config.insecure),
                                             per_site=limits.per_site_calls, idle_timeout=limits.idle_timeout))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.workers),
                         options=[*MESSAGE_OPTIONS, *limits.options(), ("grpc.so_reuseport", 0)],
                         interceptors=interceptors,
                         maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    pb_grpc.add_FederationServicer_to_server(FederationServicer(coordinator, config.insecure), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Federation"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if config.insecure:
            log.warning("serving WITHOUT TLS (--insecure): for local experiments only")
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(
                config.address, server_credentials(bundle.ca_pem, bundle.cert_pem, bundle.key_pem)
            )
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(_bind_failure(config.address))
    host = config.address.rsplit(":", 1)[0]
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    store.write_json("address.json", {"address": f"{host}:{port}"})
    log.info(
        "server listening",
        extra={"address": f"{host}:{port}", "scheme": coordinator.plan.scheme, "rounds": config.rounds,
               "sites": len(bundle.clients), "mtls": not config.insecure},
    )
    stop = stop or threading.Event()
    _on_signals(stop)
    retired_by_crl: set[str] = set()
    announced = coordinator.status().done and _announce_finished(coordinator, store, config)
    try:
        while not stop.is_set():
            if revocations is not None:
                retire_revoked(coordinator, revocations, retired_by_crl)
            if not announced and coordinator.status().done:
                announced = _announce_finished(coordinator, store, config)
            if config.exit_when_done and announced:
                if coordinator.finished.wait(timeout=config.linger):
                    log.info("every site reported its final metrics")
                else:
                    log.warning("not every site reported its final metrics in time")
                break
            try:
                coordinator.tick()
            except FedFmsError as exc:  # e.g. a damaged stored state: say so, keep serving status
                log.error("cannot apply the round deadline", extra={"error": str(exc)})
            stop.wait(0.2)
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(grace=5).wait()
        coordinator.stop_closer(timeout=120)
    log.info("server stopped", extra={"round": coordinator.status().round})
    return 0


def _announce_finished(coordinator: Coordinator, store: StateStore, config: ServerConfig) -> bool:
    """The one "federation finished" line, with where its results are; True."""
    rounds = coordinator.status().total_rounds
    then = ("the server exits once every site has reported (--exit-when-done)" if config.exit_when_done else
            "the server keeps answering `status` until stopped (Ctrl-C or SIGTERM; --exit-when-done stops it "
            "on its own)")
    log.info(f"federation finished: {rounds} rounds, final state at {store.root}; each site keeps the final "
             f"model in its STATE/final_model.pt (`fedfms-secure predict`); {then}")
    return True


def _bind_failure(address: str) -> str:
    """Why ``address`` could not be bound, with what to do: a port in use, or a host not on this machine."""
    host, port = check_address(address, flag="--address", listen=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return (f"cannot listen on {address}: {host} is not an address of this machine; give --address "
                f"0.0.0.0:{port} (every interface) or one of this machine's own addresses (the sites' --server "
                "may still name the public host)")
    return (f"cannot listen on {address}: address in use (another server, or another program, holds port {port}); "
            "stop it, or choose another --address")


def retire_revoked(coordinator: Coordinator, revocations: RevocationList, done: set[str]) -> None:
    """Counts every site that ``keys revoke`` removed as retired (once; ``done`` remembers)."""
    revocations.refresh()
    removed = revocations.removed_sites()
    if not removed.keys() - done:
        return
    status = coordinator.status()
    known = {s.name: s for s in status.sites}
    for name, entry in removed.items():
        if name in done:
            continue
        done.add(name)
        if name not in known or known[name].retired:
            continue
        coordinator.retire(name, status.round, f"certificate revoked ({entry.reason}) on {entry.date:%Y-%m-%d}")
        log.warning("revoked site counts as retired", extra={"site": name, "reason": entry.reason})


def _on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
