"""Fault injection switch: parsing, targeting and what each corruption does to an update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import faults
from common.arrays import to_record
from common.errors import ConfigError


def test_parse_and_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "h1:nan@2, h2:sign-flip")
    assert faults.active("h1", 1) is None and faults.active("h1", 2) == "nan"
    assert faults.active("h2", 7) == "sign-flip" and faults.active("h3", 2) is None
    monkeypatch.delenv(faults.ENV)
    assert faults.active("h1", 2) is None


def test_bad_spec_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        faults.parse_faults("h1:explode,h2,h3:nan@x")
    assert len(err.value.problems) == 3 and "FEDTUNE_FAULTS" in str(err.value)


def test_corruptions() -> None:
    start = to_record({"a": torch.zeros(3, 2), "b": torch.ones(2)})
    update = to_record({"a": torch.full((3, 2), 0.5), "b": torch.full((2,), 2.0)})
    flip = faults.corrupt("sign-flip", update, start)
    assert np.allclose(flip["a"].numpy(), -0.5) and np.allclose(flip["b"].numpy(), 0.0)
    big = faults.corrupt("scale-100", update, start)
    assert np.allclose(big["a"].numpy(), 50.0) and np.allclose(big["b"].numpy(), 101.0)
    assert np.isnan(faults.corrupt("nan", update, start)["a"].numpy()).any()
    assert tuple(faults.corrupt("wrong-shape", update, start)["a"].shape) == (2, 2)
