"""Adapter state dicts <-> Flower ``ArrayRecord``, and the checks a reply must pass."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one adapter tensor."""

    shape: tuple[int, ...]
    dtype: str


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Wrap an adapter state dict (tensor order kept) as an ``ArrayRecord``."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unwrap an ``ArrayRecord`` into a torch state dict."""
    return dict(record.to_torch_state_dict())


def spec_of(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The key -> (shape, dtype) template of ``record``."""
    return {k: ArraySpec(tuple(a.shape), str(a.dtype)) for k, a in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data carried by ``record``."""
    return sum(len(a.data) for a in record.values())


def update_sha256(record: ArrayRecord) -> str:
    """A digest of the update's keys, dtypes, shapes and bytes (order-independent)."""
    digest = hashlib.sha256()
    for key in sorted(record):
        arr = record[key]
        digest.update(f"{key}|{arr.dtype}|{tuple(arr.shape)}|".encode())
        digest.update(arr.data)
    return digest.hexdigest()


def check_update(record: ArrayRecord, template: Mapping[str, ArraySpec]) -> list[str]:
    """Every reason ``record`` is not a well-formed update of ``template`` (empty = fine)."""
    problems: list[str] = []
    missing = sorted(set(template) - set(record))
    extra = sorted(set(record) - set(template))
    if missing:
        problems.append(f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected keys {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key in sorted(set(template) & set(record)):
        arr, want = record[key], template[key]
        if tuple(arr.shape) != want.shape:
            problems.append(f"'{key}' has shape {tuple(arr.shape)}, expected {want.shape}")
            continue
        if str(arr.dtype) != want.dtype:
            problems.append(f"'{key}' has dtype {arr.dtype}, expected {want.dtype}")
            continue
        if not np.isfinite(arr.numpy()).all():
            problems.append(f"'{key}' holds NaN or infinite values")
    return problems
