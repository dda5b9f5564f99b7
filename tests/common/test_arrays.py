"""The update's wire precision: rounding bounds, bytes, and content that lies about its dtype."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from common.arrays import WIRE_DTYPES, check_update, decode, encode, payload_bytes, spec_of

STATE = {
    "x.lora_A.weight": torch.randn(16, 64, generator=torch.Generator().manual_seed(0)),
    "b": torch.ones(3),
}
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_an_update_round_trips_within_its_dtypes_rounding(wire: str) -> None:
    record = encode(STATE, wire)
    assert {a.dtype for a in record.values()} == {wire}
    assert check_update(record, spec_of(record)) == []
    for key, value in STATE.items():
        back = torch.from_numpy(decode(record[key]))
        assert back.dtype == torch.float32 and back.shape == value.shape
        assert float(((back - value).abs() / value.abs()).max()) <= UNIT_ROUNDOFF[wire]


def test_a_16_bit_update_is_half_the_bytes() -> None:
    full = payload_bytes(encode(STATE, "float32"))
    for wire in ("bfloat16", "float16"):
        assert payload_bytes(encode(STATE, wire)) < 0.55 * full


def test_float16_overflow_is_caught_as_non_finite() -> None:
    record = encode({"b": torch.tensor([1e6, 1.0])}, "float16")
    assert check_update(record, spec_of(record)) == ["'b' holds NaN or infinite values"]


def test_content_that_is_not_its_declared_dtype_or_shape_is_refused() -> None:
    real = encode({"b": torch.ones(4)}, "float32")["b"]
    cases = {
        "bfloat16": Array("bfloat16", (4,), real.stype, real.data),  # float32 bytes called bfloat16
        "shape": Array("float32", (2, 2), real.stype, real.data),  # declares (2, 2), holds (4,)
        "garbage": Array("float32", (4,), real.stype, b"\x93NUMPY garbage"),
    }
    for name, arr in cases.items():
        with pytest.raises(ValueError):
            decode(arr)
        problems = check_update(ArrayRecord({"b": arr}), {"b": spec_of(ArrayRecord({"b": arr}))["b"]})
        assert problems and problems[0].startswith("'b' "), name
    assert np.array_equal(decode(real), np.ones(4, dtype=np.float32))


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=200),
    flips=st.lists(st.integers(0, 255), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_any_corruption_of_an_arrays_bytes_is_a_problem_never_an_exception(
    cut: int, flips: list[int], seed: int
) -> None:
    """A hostile site controls every byte of an array: reading them may only ever say "malformed"."""
    real = bytearray(encode({"b": torch.ones(4)}, "float32")["b"].data)
    data = real[: min(cut, len(real))] if cut < len(real) else real
    for i, value in enumerate(flips):
        if data:
            data[(seed + 37 * i) % len(data)] = value
    arr = Array("float32", (4,), "numpy.ndarray", bytes(data))
    with contextlib.suppress(ValueError):  # anything else escaping is the failure
        decode(arr)
    problems = check_update(ArrayRecord({"b": arr}), {"b": spec_of(ArrayRecord({"b": arr}))["b"]})
    assert all(p.startswith("'b' ") for p in problems)


def test_a_shape_far_larger_than_the_bytes_is_refused_before_reading() -> None:
    real = encode({"b": torch.ones(4)}, "float32")["b"]
    with pytest.raises(ValueError, match="bytes"):
        decode(Array("float32", (2**40,), real.stype, real.data))
