"""Several processes, one run: torch.distributed as torchrun starts it (DDP or FSDP2), and a no-op for one process.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `start` joins the process group (gloo on CPU, NCCL on GPU).
Every pass of the model goes through a `Runner`: its forward is "run this function of the model", so a
recipe's loss, a DPO reference pass or a validation pass all run inside the DDP/FSDP forward, whose hooks
synchronise gradients (DDP) and gather the sharded parameters (FSDP), whatever internals the function calls.

The effective batch is the config's (train.batch_size x train.grad_accum rows per optimizer step) on any
number of processes: each process takes every N-th row of the step. Ranks must make the same number of
passes (FSDP gathers parameters in every forward), so a rank with fewer micro-batches pads with copies that
count for nothing (`Batch.filler`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from tunesmith.errors import Problem, UserError

Item = TypeVar("Item")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size` (`local_rank` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory (config, metrics, summary, the final weights) and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if not self.distributed:
            return [float(value) for value in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: int, device: torch.device) -> int:
        """The largest of the ranks' values."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def sum_figures(self, figures: dict[str, float]) -> dict[str, float]:
        """Named sums added up over the ranks; a name only some ranks have counts as 0 on the others."""
        if not self.distributed:
            return figures
        gathered: list[dict[str, float]] = [{} for _ in range(self.size)]
        dist.all_gather_object(gathered, figures)  # plain floats between our own processes, never a file
        return {name: sum(part.get(name, 0.0) for part in gathered) for name in sorted(set().union(*gathered))}

    def from_main(self, compute: Callable[[], Item]) -> Item:
        """`compute()` run on rank 0 alone (the others wait), its result handed to every rank."""
        if not self.distributed:
            return compute()
        result = [compute() if self.main else None]
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def share(self, items: Sequence[Item]) -> list[tuple[Item, bool]]:
        """This rank's items (every size-th, from its rank), padded to the same count on every rank.

        Each comes with `real`: False marks a filler copy, there only so every rank makes as many passes."""
        mine = list(items[self.rank :: self.size])
        count = -(-len(items) // self.size)
        filler = mine[0] if mine else (items[0] if items else None)
        return [(item, True) for item in mine] + [(filler, False)] * (count - len(mine) if filler is not None else 0)

    def gather(self, values: list[Any], total: int) -> list[Any]:
        """Reassemble what `share` split: every rank's real results back in the original order."""
        if not self.distributed:
            return values
        gathered: list[list[Any]] = [[] for _ in range(self.size)]
        dist.all_gather_object(gathered, values)
        return [gathered[index % self.size][index // self.size] for index in range(total)]


ONE_PROCESS = World()


def current_world() -> World:
    """The world torchrun describes in the environment (one process when it is not set)."""
    return World(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def start(device: torch.device) -> World:
    """Join the process group when torchrun started several processes; pick this rank's GPU first."""
    world = current_world()
    if world.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def check_settings(config: Any, world: World, device: torch.device) -> None:
    """Settings that several processes (or this device) cannot honour, every one reported before any compute."""
    train, problems = config.train, []
    if train.cpu_offload and train.parallel != "fsdp":
        problems.append(
            Problem(
                "train.cpu_offload",
                f"true offloads FSDP's shards, and train.parallel={train.parallel}; "
                f"fix: set train.parallel=fsdp, or remove train.cpu_offload",
            )
        )
    elif train.cpu_offload and device.type != "cuda":
        problems.append(
            Problem(
                "train.cpu_offload",
                "true keeps FSDP's shards in CPU memory between GPU passes, and "
                "this run trains on the CPU already; fix: remove train.cpu_offload",
            )
        )
    if world.distributed and train.unfreeze is not None:
        problems.append(
            Problem(
                "train.unfreeze",
                "gradual unfreezing changes which weights train mid-run, and DDP and "
                "FSDP fix that set when they start; fix: remove train.unfreeze, or "
                "train on one process",
            )
        )
    if world.distributed and train.parallel == "fsdp":
        fsdp = [
            (
                "adapter.type",
                config.adapter.type == "qlora",
                "qlora: FSDP cannot shard 4-bit weights; fix: use adapter.type=lora, or train.parallel=ddp",
            ),
            (
                "train.regularization",
                bool(train.regularization.l2_sp or train.regularization.l1_sp),
                "L2-SP/L1-SP anchors each weight whole, and FSDP shards them; fix: set train.parallel=ddp",
            ),
            (
                "eval.every",
                bool(config.eval.every),
                f"{config.eval.every}: the in-training eval generates on one "
                f"process, and FSDP's weights are spread over all of them; fix: set train.parallel=ddp, or unset "
                f"eval.every and run `tunesmith eval` on the finished run",
            ),
        ]
        problems += [Problem(key, message) for key, applies, message in fsdp if applies]
    if problems:
        raise UserError(f"the config cannot run on {world.size} process{'es' if world.distributed else ''}", problems)


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class Runner(torch.nn.Module):
    """`runner(fn, *args)` is `fn(model, *args)`, run as this module's forward (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def wrap(
    model: torch.nn.Module,
    world: World,
    parallel: str,
    amp_dtype: torch.dtype | None,
    cpu_offload: bool,
    layers: Sequence[torch.nn.Module],
) -> torch.nn.Module:
    """The runner to train through: plain for one process, DDP, or FSDP2 with each of `layers` sharded apart."""
    runner = Runner(model)
    if not world.distributed:
        return runner
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(runner)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {}
    if amp_dtype is not None:  # parameters gathered in the compute dtype, gradients reduced in float32
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(runner, **options)  # the root: embeddings, final norm, head, and whatever no layer holds
    return runner


def inner(runner: torch.nn.Module) -> torch.nn.Module:
    """The model inside a runner, under a DDP wrapper or not (FSDP2 shards in place: no wrapper)."""
    return getattr(runner, "module", runner).model


@contextlib.contextmanager
def gradient_sync(runner: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over the ranks in this backward (the step's last micro-batch) or only accumulate them."""
    if hasattr(runner, "no_sync") and not enabled:  # DDP
        with runner.no_sync():
            yield
        return
    if hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
        runner.set_requires_gradient_sync(enabled)
    yield
