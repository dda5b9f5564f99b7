"""Adapter state dicts <-> Flower ``ArrayRecord``, the update's wire precision, the checks a reply must pass.

An update may travel in float32, bfloat16 or float16 (``wire-dtype``): rounding the DP release is
post-processing, so it costs no privacy. NumPy has no bfloat16, so a bfloat16 array travels as its
raw 16-bit patterns (a ``uint16`` array) under the dtype name ``bfloat16``; :func:`decode` turns any
wire array back into float32 and refuses one whose content does not match what it claims to be.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WIRE_DTYPES = ("float32", "bfloat16", "float16")
_NUMPY_OF: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
}


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one adapter tensor."""

    shape: tuple[int, ...]
    dtype: str


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Wrap an adapter state dict (tensor order kept) as an ``ArrayRecord``."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def encode(state: Mapping[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """An update in ``wire_dtype`` (one of :data:`WIRE_DTYPES`), rounded to nearest."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {wire_dtype!r}: use one of {', '.join(WIRE_DTYPES)}")
    if wire_dtype != "bfloat16":
        dtype = torch.float16 if wire_dtype == "float16" else torch.float32
        return to_record({k: v.detach().to(dtype) for k, v in state.items()})
    out = {}
    for key, value in state.items():
        bits = value.detach().cpu().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        raw = Array(bits)
        out[key] = Array(dtype="bfloat16", shape=tuple(bits.shape), stype=raw.stype, data=raw.data)
    return ArrayRecord(out)


def decode(arr: Array) -> np.ndarray:
    """A wire array as float32; ``ValueError`` if its content is not the dtype and shape it declares."""
    want = _NUMPY_OF.get(arr.dtype)
    if want is None:
        raise ValueError(f"dtype {arr.dtype} is not a wire dtype ({', '.join(WIRE_DTYPES)})")
    size = math.prod(arr.shape) * want.itemsize
    if len(arr.data) < size:  # refused before numpy reads (or allocates for) a shape the bytes lack
        raise ValueError(
            f"declares {arr.dtype} {tuple(arr.shape)} ({size} bytes) but carries {len(arr.data)} bytes"
        )
    try:
        values = arr.numpy()
    except Exception as exc:  # numpy parses bytes a hostile site chose: any failure means malformed
        raise ValueError(f"unreadable array data ({type(exc).__name__}: {exc})") from None
    if values.dtype != want or tuple(values.shape) != tuple(arr.shape):
        raise ValueError(
            f"holds {values.dtype} {tuple(values.shape)}, not the {arr.dtype} {tuple(arr.shape)} it declares"
        )
    if arr.dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    return values.astype(np.float32)


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


def check_layout(record: ArrayRecord, template: Mapping[str, ArraySpec]) -> list[str]:
    """Every reason ``record``'s keys, shapes and dtypes are not ``template``'s (empty = fine)."""
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
        elif str(arr.dtype) != want.dtype:
            problems.append(f"'{key}' has dtype {arr.dtype}, expected {want.dtype}")
    return problems


def decoded_tensors(
    record: ArrayRecord, template: Mapping[str, ArraySpec]
) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor of a ``check_layout``-clean ``record`` as float32, in template order, decoded once.

    Raises ``ValueError`` naming the tensor whose bytes are malformed or whose values are not finite.
    """
    for key in template:
        try:
            values = decode(record[key])
        except ValueError as exc:
            raise ValueError(f"'{key}' {exc}") from None
        if not np.isfinite(values).all():
            raise ValueError(f"'{key}' holds NaN or infinite values")
        yield key, values


def check_update(record: ArrayRecord, template: Mapping[str, ArraySpec]) -> list[str]:
    """Every reason ``record`` is not a well-formed update of ``template`` (empty = fine)."""
    problems = check_layout(record, template)
    if problems:
        return problems
    try:
        for _ in decoded_tensors(record, template):
            pass
    except ValueError as exc:
        return [str(exc)]
    return []
