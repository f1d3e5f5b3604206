"""`tsssm run`: the main job. Train each model in ``run.models``, score the held-out data with
each, then compare them with the classical comparators: one MLflow run per step."""

from __future__ import annotations

import shlex
from collections.abc import Callable

from omegaconf import DictConfig

from tsssm import checkpoints
from tsssm.commands.compare import compare
from tsssm.commands.score import score
from tsssm.commands.train import train
from tsssm.data.datasets import build_dataset
from tsssm.errors import ConfigError


def _resumable(cfg: DictConfig) -> bool:
    """Whether ``trainer.resume=last`` finds a checkpoint of this model's config."""
    dataset = build_dataset(cfg.data)
    fp = checkpoints.fingerprint(cfg, [*dataset.files(), *dataset.extra_train_files()])
    try:
        return checkpoints.find_resume("last", cfg.tracking.output_dir, fp) is not None
    except ConfigError:
        return False


def run(cfg: DictConfig, overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> None:
    base = [o for o in overrides if not o.startswith(("model=", "compare.runs="))]
    trained: list[str] = []
    for name in cfg.run.models:
        print(f"\n== tsssm train model={name} ==", flush=True)
        chosen = [*base, f"model={name}"]
        step = compose(chosen)
        if step.trainer.resume == "last" and not _resumable(step):
            # `tsssm run ... trainer.resume=last` after an interrupt: the models it had not
            # reached yet start from scratch
            print(f"no checkpoint of model={name} to resume; training it from the start")
            fresh = [o for o in base if not o.startswith("trainer.resume=")]
            chosen = [*fresh, f"model={name}"]
            step = compose(chosen)
        run_id = train(step, chosen)
        trained.append(run_id)
        print(f"\n== tsssm score model={name} ==", flush=True)
        step = [*base, f"model={name}", f"model.run_id={run_id}"]
        # the train run has logged this test split's figures; the scores alone are new
        score(compose([*step, "score.figures=false"]), step)
    print("\n== tsssm compare ==", flush=True)
    # compare reads the trained runs; keys of one model's config (model.net.d_model=...) would
    # not compose with the default model
    shared = [o for o in base if not o.lstrip("+~").startswith("model.")]
    compare(compose([*shared, f"compare.runs=[{','.join(trained)}]"]))
    print(f"\nall runs are in MLflow at {cfg.tracking.uri}; to look at them:")
    print(f"  {dashboard_command(overrides)}")


def dashboard_command(overrides: list[str]) -> str:
    """The command that opens the dashboard over the store these overrides write to."""
    store = [o for o in overrides if o.startswith(("tracking=", "tracking.uri="))]
    return " ".join(["tsssm dashboard", *(shlex.quote(o) for o in store)])
