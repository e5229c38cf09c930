"""The privacy unit: what one DP-SGD record is, and the OS-seeded randomness DP-SGD draws from.

With the unit ``"patient"`` (the default) a record is a patient: a case of the site (one volume,
or the 2-D images of one case). :class:`PatientDataset` is indexed by patient; its item ``i`` is
one slice of patient ``i``, drawn afresh at every access with the operating system's CSPRNG. So
Opacus' Poisson sampler draws patients with ``q = expected patients per step / patients``, a
sampled patient gives exactly one per-sample gradient, clipped to C as a whole, and the noise is
sigma * C: the (epsilon, delta) guarantee holds per patient. With ``"slice"`` a record is one 2-D
slice and the guarantee does not protect patients (a patient has many slices).

Randomness: the Poisson sampler and the noise use torch generators whose whole state comes from
``os.urandom`` (CPU: the 19968 bits of the Mersenne Twister; CUDA: Philox seed and offset,
126 bits), never from a configured seed, and the noise is drawn in Opacus' ``secure_mode``
(a sum of four draws, robust to floating-point attacks on the Gaussian sampler).
"""

from __future__ import annotations

import os
import secrets
import struct
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from fedfms_secure.errors import ConfigError, DataError

UNITS: tuple[str, ...] = ("patient", "slice")
DEFAULT_UNIT = "patient"
# Mersenne Twister state of torch's CPU generator: after the_initial_seed (int64), left (int32),
# seeded (int32) and next (uint64) come 624 uint64 slots, each holding one 32-bit state word.
_MT_OFFSET, _MT_WORDS = 24, 624


def check_unit(unit: str) -> str:
    """``unit`` if it is a known privacy unit, else :class:`ConfigError` naming the choices."""
    if unit not in UNITS:
        raise ConfigError(f"unknown privacy unit {unit!r}; choose one of: {', '.join(UNITS)} (default patient)")
    return unit


def unit_words(unit: str) -> str:
    """How reports name one record of ``unit``: "patient" or "slice (does not protect patients)"."""
    return "patient" if unit == "patient" else "slice (per slice: does NOT protect patients)"


def entropy_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A torch generator whose state comes from the OS entropy pool (see the module docstring)."""
    device = torch.device(device or "cpu")
    gen = torch.Generator(device=device)
    if device.type != "cpu":
        gen.manual_seed(secrets.randbits(64))
        if hasattr(gen, "set_offset"):  # Philox counter offset: a multiple of 4
            gen.set_offset(secrets.randbits(62) * 4)
        return gen
    gen.manual_seed(1)  # a valid state (left=1, next=0: the next draw regenerates from the words)
    state = bytearray(gen.get_state().numpy().tobytes())
    words = struct.unpack(f"<{_MT_WORDS}I", os.urandom(4 * _MT_WORDS))
    if not any(words):  # all-zero Mersenne state: never happens, but it would be degenerate
        words = (1,) + words[1:]
    struct.pack_into(f"<{_MT_WORDS}Q", state, _MT_OFFSET, *words)
    struct.pack_into("<q", state, 0, secrets.randbits(63))  # reported seed only; the words decide
    gen.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return gen


def case_ids(dataset: Dataset) -> list[str]:
    """The patient (case) of every slice of ``dataset``, in item order.

    ``dataset`` has a ``patients`` (or ``cases``) list, or is a ``ConcatDataset`` of such datasets
    (pooled sites: ids are prefixed with the part's position, so equal case names of two sites
    stay two patients).
    """
    if isinstance(dataset, ConcatDataset):
        out: list[str] = []
        for k, part in enumerate(dataset.datasets):
            out += [f"{k}/{c}" for c in case_ids(part)]
        return out
    ids = getattr(dataset, "patients", None) or getattr(dataset, "cases", None)
    if ids is None or len(ids) != len(dataset):  # type: ignore[arg-type]
        raise DataError(
            f"{type(dataset).__name__} does not say which patient each slice belongs to (no `patients` or "
            "`cases` list): load sites with fedfms_secure.data.load_site, or use privacy unit 'slice'"
        )
    return [str(c) for c in ids]


_OS_RANDOM = secrets.SystemRandom()  # draws from os.urandom, like ``secrets``


class PatientDataset(Dataset):
    """A slice dataset indexed by patient: item ``i`` is one slice of patient ``i`` (``per_patient``
    = 1), or ``per_patient`` of its slices stacked (images ``[m, C, H, W]``, labels ``[m, H, W]``).

    Slices are drawn uniformly from the patient's training slices with the OS CSPRNG at each
    access (m distinct ones, or with replacement when the patient has fewer than m), so each
    Poisson step a sampled patient contributes one item: the training loop averages its m slices'
    gradients before clipping, so it is still one clipped gradient per patient.
    """

    def __init__(self, slices: Dataset, per_patient: int = 1) -> None:
        if per_patient < 1:
            raise ConfigError(f"slices per patient must be at least 1, got {per_patient}")
        self.per_patient = per_patient
        self.slices = slices
        groups: dict[str, list[int]] = {}
        for index, patient in enumerate(case_ids(slices)):
            groups.setdefault(patient, []).append(index)
        self.patients: list[str] = sorted(groups)
        self.members: list[list[int]] = [groups[p] for p in self.patients]

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> Any:
        members = self.members[index]
        if self.per_patient == 1:
            return self.slices[members[secrets.randbelow(len(members))]]
        draw = _OS_RANDOM.sample if len(members) >= self.per_patient else _OS_RANDOM.choices
        items = [self.slices[i] for i in draw(members, k=self.per_patient)]
        return tuple(torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(len(items[0])))


def records(dataset: Dataset, unit: str) -> int:
    """Number of DP records in ``dataset`` for ``unit``: its patients, or its slices."""
    if check_unit(unit) == "slice":
        return len(dataset)  # type: ignore[arg-type]
    return len(set(case_ids(dataset)))


def record_dataset(dataset: Dataset, unit: str, per_patient: int = 1) -> Dataset:
    """The dataset DP-SGD samples records from: :class:`PatientDataset` (``per_patient`` slices of
    a patient per item) or ``dataset`` itself (slice level, where ``per_patient`` must be 1)."""
    if check_unit(unit) == "patient":
        return PatientDataset(dataset, per_patient)
    if per_patient != 1:
        raise ConfigError("slices per patient applies to patient-level DP only (privacy unit 'patient')")
    return dataset


__all__ = ["DEFAULT_UNIT", "UNITS", "PatientDataset", "case_ids", "check_unit", "entropy_generator",
           "record_dataset", "records", "unit_words"]
