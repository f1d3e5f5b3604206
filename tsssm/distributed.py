"""Training on several processes (Lightning DDP): only rank 0 tracks, evaluates and saves.

``trainer=ddp`` trains with Lightning's DDP strategy on ``trainer.devices`` GPUs (or CPU
processes with ``trainer.accelerator=cpu``, gloo). Lightning's default launcher starts the other
ranks by running the program's command line again; run as is, each of them would open its own
MLflow run, evaluate and save a bundle. Here rank 0 (the process the user started) does all of
that, and the command line the other ranks run is a hidden ``tsssm _ddp-worker <config>``: it
rebuilds the same data and model from the resolved config rank 0 wrote, takes part in the fit,
and exits - it never touches the tracking store. Processes started by an external launcher
(torchrun, SLURM: ``RANK`` > 0 in their environment) are treated the same way.

Loss and metric reduction: every rank computes the losses of its shard (the samples that
DistributedSampler repeats to even the shards out are left out: tsssm.data.sharding);
:func:`global_means` turns them into the means over all ranks' scored entries (streams) or
windows (the single-process values), identical to the last bit on every rank, with the
gradient DDP's averaging makes exact - so L-BFGS takes the same steps on every rank, and a
full-batch fit on several processes equals the fit on one. The task logs these global means
weighted by the global batch, so the epoch means need no further averaging over ranks.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WORKER_COMMAND = "_ddp-worker"
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_secondary() -> bool:
    """A rank > 0 (its launcher's environment says so): it trains, and leaves tracking,
    evaluation and saving to rank 0."""
    if "RANK" in os.environ:  # torchrun, SLURM
        return int(os.environ["RANK"]) > 0
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or node > 0


def is_distributed(trainer_cfg) -> bool:
    strategy = str(getattr(trainer_cfg, "strategy", "auto"))
    devices = int(getattr(trainer_cfg, "devices", 1))
    nodes = int(getattr(trainer_cfg, "num_nodes", 1))
    return strategy.startswith("ddp") or devices > 1 or nodes > 1


class NullTracker:
    """The tracker of a secondary rank: it records nothing (``run_id``: rank 0's run)."""

    def __init__(self, run_id: str = "secondary") -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        pass

    def log_series(self, name: str, values, first_step: int = 0) -> None:
        pass


@contextmanager
def launch_workers_as(cfg, run_id: str, checkpoint: str | None) -> Iterator[None]:
    """Around rank 0's ``trainer.fit``: the command Lightning starts for the other ranks is the
    hidden worker with this config (and rank 0's run id and checkpoint to resume from); the
    launcher's environment is undone afterwards (a second DDP fit in the same process, as
    ``tsssm run`` does, must launch its own workers)."""
    from omegaconf import OmegaConf

    if is_secondary():  # a worker (or an externally launched rank) starts nothing
        yield
        return
    folder = Path(cfg.tracking.output_dir) / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.yaml"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain["_ddp"] = {"run_id": run_id, "checkpoint": checkpoint}
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))
    argv = sys.argv
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    sys.argv = [argv[0] if argv and argv[0] else "tsssm", WORKER_COMMAND, str(path)]
    try:
        yield
    finally:
        sys.argv = argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        path.unlink(missing_ok=True)
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_worker(config_path: str) -> None:
    """``tsssm _ddp-worker <config>``: one secondary rank's part of a DDP fit."""
    from omegaconf import OmegaConf

    from tsssm.checkpoints import Resume
    from tsssm.commands.common import seed_everything
    from tsssm.commands.train import fit_model
    from tsssm.data.datasets import build_dataset

    cfg = OmegaConf.load(config_path)
    launch = cfg.pop("_ddp")
    seed_everything(cfg.seed)
    data = build_dataset(cfg.data).load()
    resume = None if launch.checkpoint is None else Resume(Path(launch.checkpoint),
                                                           "rank 0's", -1)
    fit_model(cfg, data, NullTracker(launch.run_id), resume)


def _process_group() -> bool:
    import torch

    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_means(values: dict[str, torch.Tensor], weight: float
                 ) -> tuple[dict[str, torch.Tensor], float]:
    """The weighted means over every rank of ``values`` (scalars: this rank's means over what
    it holds, ``weight`` entries or windows of it; a rank that holds nothing passes weight 0),
    and the total weight. One all-reduce; outside a process group, the values and ``weight``.

    Each mean is the same to the last bit on every rank: L-BFGS's line search compares loss
    values, and a rank that saw a different last bit took another branch, after which the
    ranks' model copies (which DDP never compares) drifted apart and the "global" loss
    averaged two different models. A value that requires grad keeps this rank's share of the
    gradient: after DDP averages the gradients over ranks they are the gradient of the global
    mean."""
    import torch

    if not _process_group():
        return values, weight
    dist = torch.distributed
    keys = list(values)
    ref = values[keys[0]]
    # in float64: the sum of the ranks' shares should round like one process's sum; a rank
    # that holds nothing adds exact zeros (its values may be NaN, the mean of nothing)
    own = [v.detach().double() * weight if weight else torch.zeros((), dtype=torch.float64,
                                                                    device=ref.device)
           for v in values.values()]
    stats = torch.stack([*own, torch.tensor(float(weight), dtype=torch.float64,
                                            device=ref.device)])
    dist.all_reduce(stats)  # sums over ranks
    total = float(stats[-1])
    means = stats[:-1] / max(total, 1.0)
    out = {}
    for i, (key, value) in enumerate(values.items()):
        mean = means[i].to(value.dtype)
        if value.requires_grad:
            share = value * (weight * dist.get_world_size() / max(total, 1.0))
            # share - share.detach() is exactly 0: the value is ``mean`` bit for bit (the old
            # share + (mean - share).detach() rounded differently on each rank)
            out[key] = share - share.detach() + mean
        else:
            out[key] = mean
    return out, total


def global_mean(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """The weighted mean of every rank's ``loss`` (see :func:`global_means`)."""
    return global_means({"loss": loss}, weight)[0]["loss"]


def replicas_differ(params: list[torch.Tensor]) -> float:
    """The largest difference between the ranks' copies of ``params`` (0.0 when DDP kept them
    identical, as it must; outside a process group 0.0). Two all-reduces of the parameters."""
    import torch

    if not _process_group() or not params:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    hi, lo = flat.clone(), -flat
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MAX)
    return float((hi + lo).max())
