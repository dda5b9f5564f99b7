"""A site with several GPUs: DP-SGD across ranks is the one-device mechanism (two gloo ranks on CPU)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from flwr.app import ArrayRecord

from client.compute import ComputeSection, resolve
from client.distributed import Ranks, init_group, shard
from client.train import DPPlan, train_dp
from common.config import LoraSpec
from common.errors import ConfigError
from common.modeling import adapter_state, load_base_model, make_peft_model
from tests.client.hostile import Site, reason, serving, status

LORA = LoraSpec(rank=4, alpha=8, targets="q_proj,v_proj")
N, WIDTH, SEED = 10, 12, 11
EXACT = DPPlan(noise_multiplier=1.0, sample_rate=1.0, steps=3, max_grad_norm=0.05, expected_batch_size=N)
# a test site that lets a seeded round take every record in every step (so two sites can agree exactly)
EVERY_RECORD: dict[str, Any] = {
    "allow_seeded_noise": True, "max_epsilon": 1000.0, "privacy": {"max-sample-rate": 1.0}
}  # fmt: skip
POISSON = DPPlan(noise_multiplier=1.0, sample_rate=0.15, steps=8, max_grad_norm=0.05, expected_batch_size=2)


def _model(path: Path) -> Any:
    torch.manual_seed(0)
    return make_peft_model(load_base_model(path), LORA)


def _records() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 200, (N, WIDTH), generator=gen)
    lengths = torch.randint(4, WIDTH + 1, (N,), generator=gen)
    mask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _lora(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state(model).items()}


def _rank(rank: int, world: int, port: int, path: str, out: str) -> None:
    """One rank: the exact-batch round, then a Poisson round; rank 0 saves what came out."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_group(Ranks(rank, world, rank), cuda=False)
    try:
        ids, mask = _records()
        model = _model(Path(path))
        if rank == 1:  # a different start: the ranks must begin from rank 0's adapter
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(1.0)
        mine_ids, mine_mask, _ = shard(ids, mask, None, rank, world)
        exact = train_dp(model, mine_ids, mine_mask, EXACT, learning_rate=0.01, seed=SEED, distributed=True)
        after_exact = _lora(model)
        poisson = train_dp(model, mine_ids, mine_mask, POISSON, learning_rate=0.01, distributed=True)
        gathered: list[dict[str, torch.Tensor] | None] = [None] * world
        dist.all_gather_object(gathered, _lora(model))
        if rank == 0:
            torch.save(
                {"exact": after_exact, "gathered": gathered, "steps": (exact.steps, poisson.steps)}, out
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """What two gloo ranks produced (one spawn for every test of the module)."""
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    mp.start_processes(
        _rank, args=(2, _free_port(), str(tiny_model), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    result: dict[str, object] = torch.load(out)
    return result


def test_two_ranks_take_the_one_process_step(
    two_ranks: dict[str, object], tiny_model: Path, one_thread: None
) -> None:
    ids, mask = _records()
    model = _model(tiny_model)
    start = _lora(model)
    stats = train_dp(model, ids, mask, EXACT, learning_rate=0.01, seed=SEED)
    single = _lora(model)
    ranks = two_ranks["exact"]
    assert isinstance(ranks, dict) and set(ranks) == set(single)
    for k in single:
        torch.testing.assert_close(ranks[k], single[k], rtol=1e-5, atol=1e-7)
    moved = sum(float((single[k] - start[k]).abs().sum()) for k in single)
    assert moved > 0 and stats.steps == EXACT.steps


def test_noise_is_drawn_once_per_step(
    two_ranks: dict[str, object], tiny_model: Path, one_thread: None
) -> None:
    """Had every rank added noise, the update would not be the one-process update with one draw."""
    ids, mask = _records()
    model = _model(tiny_model)
    train_dp(model, ids, mask, EXACT, learning_rate=0.01, seed=SEED)
    one_draw = _lora(model)
    ranks = two_ranks["exact"]
    assert isinstance(ranks, dict)
    model = _model(tiny_model)
    train_dp(model, ids, mask, EXACT, learning_rate=0.01, seed=SEED + 100)  # another draw
    other = _lora(model)
    gap = max(float((other[k] - one_draw[k]).abs().max()) for k in one_draw)
    err = max(float((ranks[k] - one_draw[k]).abs().max()) for k in one_draw)
    assert err < 1e-4 * gap


def test_poisson_rounds_keep_every_rank_in_step(two_ranks: dict[str, object]) -> None:
    """Empty local batches still take the step: both ranks take plan.steps and end identical."""
    assert two_ranks["steps"] == (EXACT.steps, POISSON.steps)
    gathered = two_ranks["gathered"]
    assert isinstance(gathered, list) and len(gathered) == 2
    for k in gathered[0]:
        assert torch.equal(gathered[0][k], gathered[1][k])


def test_shards_cover_every_record_once() -> None:
    ids = torch.arange(7)[:, None]
    parts = [shard(ids, ids, None, r, 3)[0] for r in range(3)]
    assert sorted(int(x) for p in parts for x in p.flatten()) == list(range(7))
    assert [p.size(0) for p in parts] == [3, 2, 2]
    # a chunked record stays whole on one rank
    group = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    pieces = [shard(ids, ids, group, r, 2) for r in range(2)]
    assert [p[0].flatten().tolist() for p in pieces] == [[0, 1, 2, 4, 5], [3, 6]]
    assert [p[2].tolist() for p in pieces if p[2] is not None] == [[0, 0, 0, 1, 1], [0, 1]]


def test_ranks_come_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Ranks.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    ranks = Ranks.from_env()
    assert ranks == Ranks(2, 4, 2) and not ranks.leader
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="outside WORLD_SIZE"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="not integers"):
        Ranks.from_env()


def test_one_named_gpu_is_refused_for_several_ranks() -> None:
    with pytest.raises(ConfigError, match="each rank takes its own GPU"):
        resolve(ComputeSection(device="cuda:1"), local_rank=1)
    assert resolve(ComputeSection(device="cpu"), local_rank=1).device == "cpu"


@pytest.fixture(scope="module")
def torchrun_site(
    tmp_path_factory: pytest.TempPathFactory, hostile_data: Path, tiny_model: Path
) -> Iterator[Site]:
    """`torchrun --nproc-per-node 2 fedtune site serve`: rank 0 the worker, rank 1 trains with it."""
    site = Site(tmp_path_factory.mktemp("torchrun") / "site", hostile_data, tiny_model, **EVERY_RECORD)
    sock, log_path = site.root / "w.sock", site.root / "ranks.log"
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), str(bin_dir / "fedtune"), "site", "serve", str(site.policy),
        "--socket", str(sock),
    ]  # fmt: skip
    with serving(site, cmd, sock, log_path, OMP_NUM_THREADS="1"):
        yield site


@pytest.mark.slow
def test_a_torchrun_site_trains_the_one_device_update(
    torchrun_site: Site, fresh_site: Site, start_adapter: ArrayRecord
) -> None:
    """The same seeded round (every record in every step) at a 2-rank site and a one-process site."""
    fresh_site.write_policy(**EVERY_RECORD)
    ask: dict[str, Any] = {"seed": 5, "batch-size": 1000}
    ranked, single = torchrun_site.ask(start_adapter, 1, **ask), fresh_site.ask(start_adapter, 1, **ask)
    assert status(ranked) == status(single) == "trained", (reason(ranked), reason(single))
    a, b = ranked.content.array_records["arrays"], single.content.array_records["arrays"]
    assert set(a) == set(b) == set(start_adapter)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-4, atol=1e-6)
    assert any(not np.array_equal(a[k].numpy(), start_adapter[k].numpy()) for k in a)
    assert torchrun_site.kinds() == fresh_site.kinds() == ["reserve", "commit"]
    log = (torchrun_site.root / "ranks.log").read_text()
    assert "rank 1: 2 steps" in log  # the other rank trained the round, and only rank 0 wrote the ledger
