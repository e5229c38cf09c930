"""Checks of what a request carries, as pure functions: a chunked vector's layout, a metrics report.

A vector of L values travels as ceil(L / C) chunks of C values (C: the aggregator's
``chunk_values``), in order, each header repeating the round, the total and L.
"""

from __future__ import annotations

import math

from fedfms_secure.errors import FederationError
from fedfms_secure.protocol import SERVER_METRICS, Chunk

MAX_CHUNKS = 1 << 20


def shorten(text: str, limit: int = 64) -> str:
    """At most ``limit`` characters of a value a request sent: a long echo would overflow the status trailer."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def expected_values(index: int, length: int, chunk_values: int) -> int:
    """How many values chunk ``index`` of a ``length``-value vector holds."""
    return min(chunk_values, length - index * chunk_values)


def check_layout(first: Chunk, chunk_values: int, federation_length: int | None) -> None:
    """The first chunk's header describes a vector of the federation's length, chunked as it must be."""
    length, total = first.vector_length, first.total
    if not 0 < length <= MAX_CHUNKS * chunk_values:
        raise FederationError(f"vector_length {length} is out of range", "invalid_argument")
    expected = math.ceil(length / chunk_values)
    if total != expected:
        raise FederationError(
            f"a vector of {length} values travels in {expected} chunks of {chunk_values}, not {total}",
            "invalid_argument",
        )
    if federation_length is not None and length != federation_length:
        raise FederationError(
            f"update has {length} values, the federation's vector has {federation_length}: "
            "are all sites on the same plan and version?",
            "invalid_argument",
        )


def check_chunk(chunk: Chunk, first: Chunk, expected_index: int, chunk_values: int) -> None:
    """``chunk`` is the next one of the stream that ``first`` opened."""
    if (chunk.round, chunk.total, chunk.vector_length) != (first.round, first.total, first.vector_length):
        raise FederationError(
            "chunk headers changed within one stream (round, total or vector_length)", "invalid_argument"
        )
    if chunk.index != expected_index:
        raise FederationError(
            f"chunk {chunk.index} arrived where chunk {expected_index} was expected: send chunks in order",
            "invalid_argument",
        )
    values = expected_values(chunk.index, chunk.vector_length, chunk_values)
    if chunk.num_values != values:
        raise FederationError(
            f"chunk {chunk.index} of a {chunk.vector_length}-value vector holds {values} values, "
            f"not {chunk.num_values}",
            "invalid_argument",
        )


def check_metrics(metrics: dict[str, float]) -> None:
    """Only what the server knows anyway: ``contributed`` (0 or 1) and ``bytes_up`` / ``bytes_down``
    (finite, not negative). Any other name (a score, epsilon, a loss) is refused, so that no site,
    old or modified, can leave a per-site score in the server's files."""
    unknown = sorted(name for name in metrics if name not in SERVER_METRICS)
    if unknown:
        names = ", ".join(repr(shorten(name)) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise FederationError(
            f"metric(s) {names} not accepted: a site reports to the server only {', '.join(SERVER_METRICS)}; "
            "its scores stay in its own STATE/metrics.jsonl (update the site)", "invalid_argument")
    for name, value in metrics.items():
        if not math.isfinite(value) or value < 0 or (name == "contributed" and value not in (0.0, 1.0)):
            raise FederationError(
                f"metric {name} = {value!r} is out of range: contributed is 0 or 1, bytes a finite count",
                "invalid_argument")
