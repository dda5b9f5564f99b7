"""Shared fixtures: the tiny model, synthetic site data and one finished simulation.

Everything is offline and local; expensive things are built once per session.

A site must be prepared (``fedtune site prepare``) before its rounds. Tests that build a site in
this process get it prepared on its first round, as its admin would have done beforehand
(:func:`prepared_on_first_use`); a test of the unprepared site itself is marked ``unprepared``.
Sites whose rounds run in another process are prepared by their fixtures (``prepare_site``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": "",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
)

RECORDS_PER_SITE = 120


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unprepared: sites are not prepared on their first round")


@pytest.fixture(autouse=True)
def prepared_on_first_use(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A round of an unprepared site in this process prepares it first (one process, as a test's)."""
    if request.node.get_closest_marker("unprepared"):
        yield
        return
    import client.data
    from client.prepare import prepare_site
    from client.prepared import SiteNotPreparedError

    read = client.data.read_manifest

    def read_or_prepare(policy: Any, kind: str) -> dict[str, Any]:
        try:
            return read(policy, kind)
        except SiteNotPreparedError:
            prepare_site(policy, kinds=[kind])
            return read(policy, kind)

    monkeypatch.setattr(client.data, "read_manifest", read_or_prepare)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny base model, built once."""
    from embedded.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic PII-laden notes for three sites (one JSONL each + answer keys)."""
    from embedded.synthdata import write_synthetic_sites

    out = tmp_path_factory.mktemp("data")
    write_synthetic_sites(out, sites=3, records_per_site=RECORDS_PER_SITE, seed=1)
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, site_data: Path) -> dict[str, Any]:
    """One finished 3-site x 3-round simulation shared by every test that only reads it."""
    from fedtune.simulate import simulate

    out = tmp_path_factory.mktemp("runs") / "demo"
    summary = simulate(out, sites=3, rounds=3, model=tiny_model, data=site_data, max_epsilon=8.0)
    return {"out": out, "summary": summary}
