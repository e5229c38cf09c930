"""The exception tree of fedfms-secure.

Every error a user can cause is one of these, and its message says what to do next::

    FedFmsError
     ├── ConfigError            a flag, a TOML file or a combination of them is wrong
     ├── DataError              a site folder or a dataset file is missing, corrupt or mismatched
     ├── KeyMaterialError       a key bundle, certificate or CKKS context is missing or wrong
     ├── CryptoError            a ciphertext cannot be used
     │    └── ContextMismatchError   it was made under another CKKS context
     ├── ModelError             a model preset, mode or checkpoint is wrong
     ├── PrivacyBudgetExhausted a site's epsilon budget does not allow another round
     └── FederationError        the server refused a request or cannot be reached
          ├── ServerUnreachable
          └── UpdateAlreadyReceived  the server holds an upload of this site for that round
"""

from __future__ import annotations


class FedFmsError(Exception):
    """Base class of every error that fedfms-secure raises on purpose."""


class ConfigError(FedFmsError):
    """A flag, a config file or a combination of them is invalid."""


class DataError(FedFmsError):
    """A site folder or a file in it is missing, corrupt or mismatched."""


class KeyMaterialError(FedFmsError):
    """A key bundle, certificate, private key or CKKS context is missing or wrong."""


class CryptoError(FedFmsError):
    """A ciphertext is malformed, truncated or otherwise unusable."""


class ContextMismatchError(CryptoError):
    """A ciphertext was produced under a different CKKS context than the receiver's."""


class ModelError(FedFmsError):
    """A model preset, training mode or checkpoint is invalid."""


class PrivacyBudgetExhausted(FedFmsError):
    """Training another round would take a site past its (epsilon, delta) budget."""


class FederationError(FedFmsError):
    """The coordinating server refused a request.

    ``code`` is one of ``invalid_argument``, ``failed_precondition``, ``permission_denied``,
    ``resource_exhausted``, ``not_found``, ``unavailable``: the transport maps it to and from
    the gRPC status of the same name. A subclass with its own ``reason`` travels as that reason
    (gRPC trailing metadata), so the receiving end raises the same class.
    """

    reason = ""

    def __init__(self, message: str, code: str = "failed_precondition") -> None:
        super().__init__(message)
        self.code = code


class ServerUnreachable(FederationError):
    """The coordinating server cannot be reached."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unavailable")


class UpdateAlreadyReceived(FederationError):
    """The server already holds an upload of this site for the round (a retry after a lost reply)."""

    reason = "already_uploaded"
