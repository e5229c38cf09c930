"""The round protocol as plain dataclasses.

Only ``fedfms_secure.transport`` converts between these and the generated protobuf messages;
the coordinator and the site work on these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PHASE_COMMIT = "commit"
PHASE_UPLOAD = "upload"
PHASE_DONE = "done"

#: the only metrics a site reports to the server after a round (the server refuses any other name):
#: whether it contributed (the server knows who uploaded) and the bytes it moved (the server sees the
#: traffic). Its scores, epsilon and loss stay in its own ``STATE/metrics.jsonl``.
SERVER_METRICS = ("contributed", "bytes_up", "bytes_down")


def user_round(index: int) -> int:
    """The round number users see (rounds 1..R in logs, ``status``, reports) of the protocol's
    0-based round index (round r's global state is ``theta_r``; the federation is done at R)."""
    return index + 1


@dataclass(frozen=True)
class Plan:
    """The federation's plan, fixed by the coordinator and sent to every site on join."""

    federation: str
    rounds: int
    mode: str
    preset: str
    seed: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    scheme: str
    pretrained: bool = True  # the preset's shipped weights (tiny), else the seeded initialisation
    num_classes: int = 1  # foreground classes: every site's label map must give this many (0: not fixed)
    image_size: int = 0  # model input side in pixels (0: the preset's)


@dataclass(frozen=True)
class KeyEpoch:
    """The CKKS key every ciphertext must be made under, from ``round`` on.

    Epoch 1 is the first key (made at a site by ``keys he-init``, or by the provisioning host);
    each ``keys rotate-he`` adds one. Epoch 0 means no key exists yet.
    """

    epoch: int = 0
    fingerprint: str = ""
    round: int = 0
    site: str = ""  # the site that made it; "" for the provisioning host


NO_KEY = KeyEpoch()


@dataclass(frozen=True)
class Joined:
    site: str
    plan: Plan
    round: int
    key: KeyEpoch = NO_KEY
    #: rounds whose aggregate took this site's upload, oldest first (what its privacy budget has spent)
    contributed_rounds: tuple[int, ...] = ()


@dataclass(frozen=True)
class KeyPublication:
    """The header of a new key epoch (``PublishKeys``): what it replaces and when it starts."""

    epoch: int
    fingerprint: str
    round: int
    previous_fingerprint: str = ""
    envelopes: int = 0
    state_chunks: int = 0


@dataclass(frozen=True)
class SealedEnvelope:
    """One site's copy of a new key, sealed to that site (the server cannot open it)."""

    recipient: str
    payload: bytes


@dataclass(frozen=True)
class KeyAck:
    key: KeyEpoch
    envelopes: int
    state_chunks: int


@dataclass(frozen=True)
class Envelope:
    """A site's sealed envelope of one key epoch, as the server relays it (opaque bytes)."""

    key: KeyEpoch
    payload: bytes


@dataclass(frozen=True)
class Chunk:
    """One ciphertext (or plaintext block) of a streamed vector."""

    round: int
    index: int
    total: int
    num_values: int
    fingerprint: str
    payload: bytes
    vector_length: int


@dataclass(frozen=True)
class Receipt:
    round: int
    chunks: int
    bytes: int
    digest: str


@dataclass(frozen=True)
class CommitAck:
    round: int
    committed: int
    expected: int


@dataclass(frozen=True)
class WeightTotal:
    round: int
    ready: bool
    payload: bytes = b""
    participants: int = 0


@dataclass(frozen=True)
class SiteStatus:
    name: str
    joined: bool = False
    committed: bool = False
    uploaded: bool = False
    last_seen: float = 0.0
    retired: bool = False
    retired_reason: str = ""


@dataclass(frozen=True)
class Status:
    federation: str
    round: int
    total_rounds: int
    phase: str
    sites: tuple[SiteStatus, ...] = field(default_factory=tuple)
    deadline: float = 0.0  # unix time when the open phase goes on with a quorum; 0: waits for all
    key: KeyEpoch = NO_KEY  # the CKKS key in use

    @property
    def done(self) -> bool:
        return self.phase == PHASE_DONE
