"""`tsssm run`: the main job. Train each model in ``run.models``, score the held-out data with
each, then compare them with the classical comparators: one MLflow run per step."""

from __future__ import annotations

import shlex
from collections.abc import Callable

from omegaconf import DictConfig

from tsssm.commands.compare import compare
from tsssm.commands.score import score
from tsssm.commands.train import train


def run(cfg: DictConfig, overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> None:
    base = [o for o in overrides if not o.startswith(("model=", "compare.runs="))]
    trained: list[str] = []
    for name in cfg.run.models:
        print(f"\n== tsssm train model={name} ==", flush=True)
        run_id = train(compose([*base, f"model={name}"]))
        trained.append(run_id)
        print(f"\n== tsssm score model={name} ==", flush=True)
        # the train run has logged this test split's figures; the scores alone are new
        score(compose([*base, f"model={name}", f"model.run_id={run_id}", "score.figures=false"]))
    print("\n== tsssm compare ==", flush=True)
    compare(compose([*base, f"compare.runs=[{','.join(trained)}]"]))
    print(f"\nall runs are in MLflow at {cfg.tracking.uri}; to look at them:")
    print(f"  {dashboard_command(overrides)}")


def dashboard_command(overrides: list[str]) -> str:
    """The command that opens the dashboard over the store these overrides write to."""
    store = [o for o in overrides if o.startswith(("tracking=", "tracking.uri="))]
    return " ".join(["tsssm dashboard", *(shlex.quote(o) for o in store)])
