"""Conversions between protobuf messages and the protocol's dataclasses (``x_to_proto``/``x_from_proto``)."""

from __future__ import annotations

from fedfms_secure.protocol import (
    Chunk,
    CommitAck,
    Envelope,
    Joined,
    KeyAck,
    KeyEpoch,
    KeyPublication,
    Plan,
    Receipt,
    SiteStatus,
    Status,
    WeightTotal,
)
from fedfms_secure.v1 import federation_pb2 as pb


def plan_to_proto(plan: Plan) -> pb.Plan:
    return pb.Plan(
        federation=plan.federation,
        rounds=plan.rounds,
        mode=plan.mode,
        preset=plan.preset,
        seed=plan.seed,
        local_epochs=plan.local_epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        scheme=plan.scheme,
        random_init=not plan.pretrained,
        num_classes=plan.num_classes,
        image_size=plan.image_size,
    )


def plan_from_proto(msg: pb.Plan) -> Plan:
    return Plan(
        federation=msg.federation,
        rounds=msg.rounds,
        mode=msg.mode,
        preset=msg.preset,
        seed=msg.seed,
        local_epochs=msg.local_epochs,
        batch_size=msg.batch_size,
        learning_rate=msg.learning_rate,
        scheme=msg.scheme,
        pretrained=not msg.random_init,
        num_classes=msg.num_classes,  # 0: a server older than the field, which fixes no class count
        image_size=msg.image_size,  # 0: a server older than the field, i.e. the preset's size
    )


def joined_from_proto(msg: pb.JoinResponse) -> Joined:
    return Joined(site=msg.site, plan=plan_from_proto(msg.plan), round=msg.round, key=key_from_proto(msg.key),
                  contributed_rounds=tuple(msg.contributed_rounds))


def key_to_proto(key: KeyEpoch) -> pb.KeyEpoch:
    return pb.KeyEpoch(epoch=key.epoch, context_fingerprint=key.fingerprint, round=key.round, site=key.site)


def key_from_proto(msg: pb.KeyEpoch) -> KeyEpoch:
    return KeyEpoch(epoch=msg.epoch, fingerprint=msg.context_fingerprint, round=msg.round, site=msg.site)


def publication_to_proto(p: KeyPublication) -> pb.KeyEpochHeader:
    return pb.KeyEpochHeader(epoch=p.epoch, context_fingerprint=p.fingerprint, round=p.round,
                             previous_fingerprint=p.previous_fingerprint, envelopes=p.envelopes,
                             state_chunks=p.state_chunks)


def publication_from_proto(msg: pb.KeyEpochHeader) -> KeyPublication:
    return KeyPublication(epoch=msg.epoch, fingerprint=msg.context_fingerprint, round=msg.round,
                          previous_fingerprint=msg.previous_fingerprint, envelopes=msg.envelopes,
                          state_chunks=msg.state_chunks)


def key_ack_to_proto(ack: KeyAck) -> pb.PublishKeysResponse:
    return pb.PublishKeysResponse(key=key_to_proto(ack.key), envelopes=ack.envelopes, state_chunks=ack.state_chunks)


def key_ack_from_proto(msg: pb.PublishKeysResponse) -> KeyAck:
    return KeyAck(key=key_from_proto(msg.key), envelopes=msg.envelopes, state_chunks=msg.state_chunks)


def envelope_to_proto(e: Envelope) -> pb.GetEnvelopeResponse:
    return pb.GetEnvelopeResponse(key=key_to_proto(e.key), envelope=e.payload)


def envelope_from_proto(msg: pb.GetEnvelopeResponse) -> Envelope:
    return Envelope(key=key_from_proto(msg.key), payload=msg.envelope)


def chunk_to_proto(chunk: Chunk) -> pb.Chunk:
    return pb.Chunk(
        round=chunk.round,
        index=chunk.index,
        total=chunk.total,
        num_values=chunk.num_values,
        context_fingerprint=chunk.fingerprint,
        payload=chunk.payload,
        vector_length=chunk.vector_length,
    )


def chunk_from_proto(msg: pb.Chunk) -> Chunk:
    return Chunk(
        round=msg.round,
        index=msg.index,
        total=msg.total,
        num_values=msg.num_values,
        fingerprint=msg.context_fingerprint,
        payload=msg.payload,
        vector_length=msg.vector_length,
    )


def receipt_to_proto(r: Receipt) -> pb.UploadReceipt:
    return pb.UploadReceipt(round=r.round, chunks=r.chunks, bytes=r.bytes, digest=r.digest)


def receipt_from_proto(msg: pb.UploadReceipt) -> Receipt:
    return Receipt(round=msg.round, chunks=msg.chunks, bytes=msg.bytes, digest=msg.digest)


def commit_ack_to_proto(ack: CommitAck) -> pb.CommitWeightResponse:
    return pb.CommitWeightResponse(round=ack.round, committed=ack.committed, expected=ack.expected)


def commit_ack_from_proto(msg: pb.CommitWeightResponse) -> CommitAck:
    return CommitAck(round=msg.round, committed=msg.committed, expected=msg.expected)


def weight_total_to_proto(w: WeightTotal, fingerprint: str) -> pb.GetWeightTotalResponse:
    return pb.GetWeightTotalResponse(
        ready=w.ready,
        round=w.round,
        context_fingerprint=fingerprint,
        encrypted_total=w.payload,
        participants=w.participants,
    )


def weight_total_from_proto(msg: pb.GetWeightTotalResponse) -> WeightTotal:
    return WeightTotal(round=msg.round, ready=msg.ready, payload=msg.encrypted_total, participants=msg.participants)


def status_to_proto(s: Status) -> pb.GetStatusResponse:
    return pb.GetStatusResponse(
        federation=s.federation,
        round=s.round,
        total_rounds=s.total_rounds,
        phase=s.phase,
        done=s.done,
        phase_deadline_unix=s.deadline,
        key=key_to_proto(s.key),
        sites=[
            pb.SiteStatus(
                name=x.name, joined=x.joined, committed=x.committed, uploaded=x.uploaded, last_seen_unix=x.last_seen,
                retired=x.retired, retired_reason=x.retired_reason,
            )
            for x in s.sites
        ],
    )


def status_from_proto(msg: pb.GetStatusResponse) -> Status:
    sites = tuple(
        SiteStatus(name=x.name, joined=x.joined, committed=x.committed, uploaded=x.uploaded, last_seen=x.last_seen_unix,
                   retired=x.retired, retired_reason=x.retired_reason)
        for x in msg.sites
    )
    return Status(msg.federation, msg.round, msg.total_rounds, msg.phase, sites, msg.phase_deadline_unix,
                  key_from_proto(msg.key))
