"""`tsssm run`: the main job. Train each model in ``run.models``, score the held-out data with
each, then compare them with the classical comparators: one MLflow run per step."""

from __future__ import annotations

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
        score(compose([*base, f"model={name}", f"model.run_id={run_id}"]))
    print("\n== tsssm compare ==", flush=True)
    compare(compose([*base, f"compare.runs=[{','.join(trained)}]"]))
    print("\nall runs are in MLflow: mlflow ui --backend-store-uri "
          f"{cfg.tracking.uri}")
