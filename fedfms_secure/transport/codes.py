"""What both ends of the wire agree on besides the messages: metadata keys and status codes.

A ``FederationError``'s ``code`` travels as the gRPC status of the same name; a subclass that
marks a particular refusal (its ``reason``) travels in the ``fedfms-reason`` trailing metadata,
so the site's stub raises the same class and no caller has to match message text.
"""

from __future__ import annotations

import grpc

from fedfms_secure.errors import FederationError, UpdateAlreadyReceived

SITE_METADATA_KEY = "fedfms-site"  # identity header, honoured only on an --insecure server
REASON_METADATA_KEY = "fedfms-reason"  # which FederationError subclass a refusal is

STATUS_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
CODE_NAMES = {status: name for name, status in STATUS_CODES.items()}

#: the refusals that the site's stub raises as their own class, by their ``reason``
REASON_CLASSES: dict[str, type[FederationError]] = {cls.reason: cls for cls in (UpdateAlreadyReceived,)}
