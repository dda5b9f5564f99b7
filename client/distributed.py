"""A site with several GPUs: data-parallel DP-SGD across ``torchrun`` ranks, one mechanism.

``torchrun --nproc-per-node N fedtune site serve POLICY`` starts N ranks on the site's machine.
Rank 0 is the site worker -- the only one that reads the data, holds the key and writes the
ledger; the other ranks only train. For every round rank 0 decides (budget gate, reservation)
exactly as a one-GPU site does, then hands the round to the other ranks (:class:`LeaderStep`):
the LoRA layout, the DP plan and, when they changed, each rank's shard of the tokenized records.

The step is Opacus's distributed DP-SGD (``DistributedDPOptimizer``): every rank Poisson-samples
its own shard with the plan's sample rate -- so each record is in a step with that probability,
as on one device -- clips each record's gradient to the plan's norm, the clipped sums are summed
across ranks, and only rank 0 adds the Gaussian noise, once per step. Every rank takes every
step, an empty local batch included, so the ledger's ``steps`` and ``sample_rate`` describe the
mechanism unchanged. Only the trainable LoRA tensors are broadcast from rank 0 at the start of a
round (Opacus's ``DifferentiallyPrivateDistributedDataParallel`` would also broadcast the frozen
base, gigabytes per round). A rank that dies ends the whole group (torchrun stops the others).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from client.objectives import Objective, records_of, token_mean
from client.tokens import take_records
from client.train import DEFAULT_MODE, Batch, DPMode, DPPlan, TrainStats, train_dp
from common.errors import ConfigError

log = logging.getLogger(__name__)

IDLE = timedelta(days=7)
"""How long the other ranks wait for the next round before the group gives up (rounds can be hours apart)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the site's ranks (from torchrun's environment)."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks torchrun started, or ``None`` for a one-process site (no ``WORLD_SIZE`` or 1)."""
        raw = {k: os.environ.get(k, "") for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        if raw["WORLD_SIZE"] in ("", "1"):
            return None
        try:
            ranks = cls(int(raw["RANK"]), int(raw["WORLD_SIZE"]), int(raw["LOCAL_RANK"] or raw["RANK"]))
        except ValueError:
            raise ConfigError(
                "environment", [f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers: {raw}"]
            ) from None
        if not 0 <= ranks.rank < ranks.world:
            raise ConfigError("environment", [f"RANK {ranks.rank} is outside WORLD_SIZE {ranks.world}"])
        return ranks

    @property
    def leader(self) -> bool:
        """Rank 0: the site worker (data, key, ledger)."""
        return self.rank == 0


def init_group(ranks: Ranks, *, cuda: bool) -> None:
    """Join the site's process group: NCCL between GPUs, gloo on CPU (``MASTER_ADDR`` / ``MASTER_PORT``)."""
    if cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=ranks.rank, world_size=ranks.world, timeout=IDLE)


def shard(ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor | None, rank: int, world: int) -> Batch:
    """Rank ``rank``'s records: every ``world``-th record from ``rank``, with all of its rows."""
    if group is None:
        return ids[rank::world].contiguous(), mask[rank::world].contiguous(), None
    mine = torch.arange(rank, records_of(group, ids.size(0)), world)
    return take_records(ids, mask, group, mine)


class LeaderStep:
    """Rank 0's train step (a :data:`client.train.TrainStep`): hand the round over, train shard 0."""

    def __init__(self, mode: DPMode = DEFAULT_MODE) -> None:
        self.agent: Any = None
        self.mode: DPMode = mode
        self._sent: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, agent: Any) -> None:
        """Make this the train step of ``agent`` (the site worker's agent; rebuilt if its policy changes)."""
        if self.agent is not agent:
            agent.train_step, agent.local_rank = self, 0
            self.agent, self._sent = agent, None

    def __call__(
        self,
        model: torch.nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        plan: DPPlan,
        *,
        learning_rate: float,
        seed: int | None = None,
        group: torch.Tensor | None = None,
        objective: Objective = token_mean,
    ) -> TrainStats:
        """Train one round across every rank."""
        world = dist.get_world_size()
        fresh = self._sent is None or self._sent[0] is not ids or self._sent[1] is not mask
        order = {
            "op": "train", "lora": self.agent.lora, "plan": plan, "learning_rate": learning_rate,
            "seed": seed, "mode": self.mode, "objective": objective, "data": fresh,
        }  # fmt: skip
        dist.broadcast_object_list([order], src=0)
        if fresh:
            shards = [shard(ids, mask, group, r, world) for r in range(world)]
            mine: list[Any] = [None]
            dist.scatter_object_list(mine, shards, src=0)
            self._sent = (ids, mask)
        b_ids, b_mask, b_group = shard(ids, mask, group, 0, world)
        return train_dp(
            model, b_ids, b_mask, plan, learning_rate=learning_rate, seed=seed, group=b_group,
            objective=objective, mode=self.mode, distributed=True,
        )  # fmt: skip

    def stop(self) -> None:
        """Release the other ranks (they leave their loop and exit)."""
        dist.broadcast_object_list([{"op": "stop"}], src=0)


def follow(policy_path: str | Path, ranks: Ranks) -> None:
    """A rank above 0: train each round rank 0 hands over, until it says stop. Never reads the data."""
    from client.compute import check_fit, load_base, peft_for_dp, resolve
    from client.policy import load_policy

    policy = load_policy(Path(policy_path))
    where = f"{policy.source} [compute]"
    compute = resolve(policy.compute, where=where, local_rank=ranks.local_rank)
    check_fit(policy.model_path, compute, where=where)
    model: Any = None
    lora: Any = None
    ids = mask = torch.zeros((0, 0), dtype=torch.long)
    group: torch.Tensor | None = None
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        order = box[0]
        if order["op"] == "stop":
            log.info("rank %d: stopped by rank 0", ranks.rank)
            return
        if order["data"]:
            mine: list[Any] = [None]
            dist.scatter_object_list(mine, None, src=0)
            ids, mask, group = mine[0]
        if model is None or order["lora"] != lora:
            model = None
            model, lora = (
                peft_for_dp(load_base(policy.model_path, compute), order["lora"], compute),
                order["lora"],
            )
        stats = train_dp(
            model, ids, mask, order["plan"], distributed=True,
            learning_rate=order["learning_rate"], seed=order["seed"], group=group,
            objective=order["objective"], mode=order["mode"],
        )  # fmt: skip
        log.info("rank %d: %d steps (%d empty)", ranks.rank, stats.steps, stats.empty_batches)
