from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("context_fingerprint", "client_version")
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    context_fingerprint: str
    client_version: str
    def __init__(self, context_fingerprint: _Optional[str] = ..., client_version: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("federation", "rounds", "mode", "preset", "seed", "local_epochs", "batch_size", "learning_rate", "scheme", "random_init", "num_classes", "image_size")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    RANDOM_INIT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    federation: str
    rounds: int
    mode: str
    preset: str
    seed: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    scheme: str
    random_init: bool
    num_classes: int
    image_size: int
    def __init__(self, federation: _Optional[str] = ..., rounds: _Optional[int] = ..., mode: _Optional[str] = ..., preset: _Optional[str] = ..., seed: _Optional[int] = ..., local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., scheme: _Optional[str] = ..., random_init: _Optional[bool] = ..., num_classes: _Optional[int] = ..., image_size: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("site", "plan", "round", "key", "contributed_rounds")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    site: str
    plan: Plan
    round: int
    key: KeyEpoch
    contributed_rounds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, site: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., round: _Optional[int] = ..., key: _Optional[_Union[KeyEpoch, _Mapping]] = ..., contributed_rounds: _Optional[_Iterable[int]] = ...) -> None: ...

class KeyEpoch(_message.Message):
    __slots__ = ("epoch", "context_fingerprint", "round", "site")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    context_fingerprint: str
    round: int
    site: str
    def __init__(self, epoch: _Optional[int] = ..., context_fingerprint: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ...) -> None: ...

class GetGlobalStateRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("round", "index", "total", "num_values", "context_fingerprint", "payload", "vector_length")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    index: int
    total: int
    num_values: int
    context_fingerprint: str
    payload: bytes
    vector_length: int
    def __init__(self, round: _Optional[int] = ..., index: _Optional[int] = ..., total: _Optional[int] = ..., num_values: _Optional[int] = ..., context_fingerprint: _Optional[str] = ..., payload: _Optional[bytes] = ..., vector_length: _Optional[int] = ...) -> None: ...

class CommitWeightRequest(_message.Message):
    __slots__ = ("round", "context_fingerprint", "encrypted_weight")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    round: int
    context_fingerprint: str
    encrypted_weight: bytes
    def __init__(self, round: _Optional[int] = ..., context_fingerprint: _Optional[str] = ..., encrypted_weight: _Optional[bytes] = ...) -> None: ...

class CommitWeightResponse(_message.Message):
    __slots__ = ("round", "committed", "expected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    committed: int
    expected: int
    def __init__(self, round: _Optional[int] = ..., committed: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...

class GetWeightTotalRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class GetWeightTotalResponse(_message.Message):
    __slots__ = ("ready", "round", "context_fingerprint", "encrypted_total", "participants")
    READY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    round: int
    context_fingerprint: str
    encrypted_total: bytes
    participants: int
    def __init__(self, ready: _Optional[bool] = ..., round: _Optional[int] = ..., context_fingerprint: _Optional[str] = ..., encrypted_total: _Optional[bytes] = ..., participants: _Optional[int] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("round", "chunks", "bytes", "digest")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    round: int
    chunks: int
    bytes: int
    digest: str
    def __init__(self, round: _Optional[int] = ..., chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("round", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RetireRequest(_message.Message):
    __slots__ = ("round", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RetireResponse(_message.Message):
    __slots__ = ("active_sites",)
    ACTIVE_SITES_FIELD_NUMBER: _ClassVar[int]
    active_sites: int
    def __init__(self, active_sites: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteStatus(_message.Message):
    __slots__ = ("name", "joined", "committed", "uploaded", "last_seen_unix", "retired", "retired_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    joined: bool
    committed: bool
    uploaded: bool
    last_seen_unix: float
    retired: bool
    retired_reason: str
    def __init__(self, name: _Optional[str] = ..., joined: _Optional[bool] = ..., committed: _Optional[bool] = ..., uploaded: _Optional[bool] = ..., last_seen_unix: _Optional[float] = ..., retired: _Optional[bool] = ..., retired_reason: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("federation", "round", "total_rounds", "phase", "sites", "done", "phase_deadline_unix", "key")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PHASE_DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    federation: str
    round: int
    total_rounds: int
    phase: str
    sites: _containers.RepeatedCompositeFieldContainer[SiteStatus]
    done: bool
    phase_deadline_unix: float
    key: KeyEpoch
    def __init__(self, federation: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., phase: _Optional[str] = ..., sites: _Optional[_Iterable[_Union[SiteStatus, _Mapping]]] = ..., done: _Optional[bool] = ..., phase_deadline_unix: _Optional[float] = ..., key: _Optional[_Union[KeyEpoch, _Mapping]] = ...) -> None: ...

class KeyEpochHeader(_message.Message):
    __slots__ = ("epoch", "context_fingerprint", "round", "previous_fingerprint", "envelopes", "state_chunks")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENVELOPES_FIELD_NUMBER: _ClassVar[int]
    STATE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    context_fingerprint: str
    round: int
    previous_fingerprint: str
    envelopes: int
    state_chunks: int
    def __init__(self, epoch: _Optional[int] = ..., context_fingerprint: _Optional[str] = ..., round: _Optional[int] = ..., previous_fingerprint: _Optional[str] = ..., envelopes: _Optional[int] = ..., state_chunks: _Optional[int] = ...) -> None: ...

class SealedEnvelope(_message.Message):
    __slots__ = ("recipient", "envelope")
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    recipient: str
    envelope: bytes
    def __init__(self, recipient: _Optional[str] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class PublishKeysRequest(_message.Message):
    __slots__ = ("header", "envelope", "state")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    header: KeyEpochHeader
    envelope: SealedEnvelope
    state: Chunk
    def __init__(self, header: _Optional[_Union[KeyEpochHeader, _Mapping]] = ..., envelope: _Optional[_Union[SealedEnvelope, _Mapping]] = ..., state: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PublishKeysResponse(_message.Message):
    __slots__ = ("key", "envelopes", "state_chunks")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ENVELOPES_FIELD_NUMBER: _ClassVar[int]
    STATE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    key: KeyEpoch
    envelopes: int
    state_chunks: int
    def __init__(self, key: _Optional[_Union[KeyEpoch, _Mapping]] = ..., envelopes: _Optional[int] = ..., state_chunks: _Optional[int] = ...) -> None: ...

class GetEnvelopeRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class GetEnvelopeResponse(_message.Message):
    __slots__ = ("key", "envelope")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    key: KeyEpoch
    envelope: bytes
    def __init__(self, key: _Optional[_Union[KeyEpoch, _Mapping]] = ..., envelope: _Optional[bytes] = ...) -> None: ...
