"""Mutual-TLS credentials and channel options for both ends."""

from __future__ import annotations

import grpc

# Ciphertext chunks are ~0.25 MiB (one CKKS ciphertext at N=8192); anything past a few MiB is refused.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def server_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """TLS that requires every client to present a certificate signed by the federation's CA."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def client_channel(
    address: str,
    *,
    ca_pem: bytes | None = None,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    server_name: str | None = None,
    insecure: bool = False,
) -> grpc.Channel:
    """A channel to the coordinator: mutual TLS, unless ``insecure`` is asked for explicitly."""
    options = list(MESSAGE_OPTIONS)
    if insecure:
        return grpc.insecure_channel(address, options=options)
    if server_name:
        # the server certificate names the federation's server host; the address may be an IP
        options.append(("grpc.ssl_target_name_override", server_name))
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    return grpc.secure_channel(address, creds, options=options)
