"""`tsssm train model=ensemble`: train each member through the ordinary training path, fit the
combination on the validation split, evaluate and save the ensemble like any model.

Each member is trained exactly as ``tsssm train <this command's overrides> model=<member>
<the member's model.member_overrides>`` would train it (its own model config, optimiser, epochs and
checkpoints, its own bundle), as an MLflow run nested under the ensemble's run (tags
``mlflow.parentRunId`` and ``tsssm.parent``): in this process one after the other
(``model.jobs=1``) or each in its own process, ``model.jobs`` at once. Then the ensemble run
loads the members' bundles, fits the weights and the pooled variance's calibration on the
validation windows (tsssm.tasks.combine, tsssm.tasks.calibrate), evaluates on every split and
saves one bundle holding every member's weights and the fitted combination.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from tsssm.bundle import Bundle, build_net, load_bundle
from tsssm.commands.common import labelled_training_rows, seed_everything, staging
from tsssm.config import option_value
from tsssm.data.datasets import PreparedData, build_dataset
from tsssm.errors import ConfigError, ModelError, TsssmError
from tsssm.models.ensemble import ENSEMBLE_TARGET, place_members
from tsssm.tasks.combine import CombinationFit, fit_combination
from tsssm.tracking import Tracker

log = logging.getLogger("tsssm")

#: overrides of the ensemble's command that its members do not inherit (the ensemble's own
#: model keys, and what identifies the ensemble's run)
_NOT_INHERITED = ("model=", "model.", "parent_run=", "run_name=")


def member_overrides(cfg: DictConfig, overrides: list[str], member: str, parent: str
                     ) -> list[str]:
    """The overrides that train ``member``: the command's (but its model keys), the member's
    model config and its own extra overrides, and the parent run."""
    base = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_INHERITED)]
    extra = [o for name, _, o in (str(i).partition(":") for i in cfg.model.member_overrides)
             if name == member]
    return [*base, f"model={member}", *extra, f"parent_run={parent}"]


def _device(cfg: DictConfig) -> torch.device:
    if cfg.trainer.accelerator in ("gpu", "cuda") or (
            cfg.trainer.accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer=gpu, but no CUDA device is visible; use trainer=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def _train_in_process(cfg: DictConfig, overrides: list[str], parent: str) -> dict[str, str]:
    from tsssm.cli import compose
    from tsssm.commands.train import train

    runs = {}
    for member in cfg.model.members:
        print(f"\n== ensemble member {member}: tsssm train model={member} ==", flush=True)
        try:
            runs[member] = train(compose(member_overrides(cfg, overrides, member, parent)))
        except TsssmError as err:  # which member, then its own one-line reason
            raise type(err)(f"ensemble member {member!r}: {err}") from err
    return runs


def _train_in_processes(cfg: DictConfig, overrides: list[str], parent: str,
                        tracker: Tracker) -> dict[str, str]:
    """Each member's `tsssm train` in its own process, ``model.jobs`` at once; their output
    goes to ``<output_dir>/ensembles/<run id>/<member>.log``."""
    logs = Path(cfg.tracking.output_dir) / "ensembles" / parent
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(cfg.model.members)
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    failed: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < cfg.model.jobs:
                member = pending.pop(0)
                path = logs / f"{member}.log"
                command = [sys.executable, "-m", "tsssm.cli", "train",
                           *member_overrides(cfg, overrides, member, parent)]
                print(f"ensemble member {member}: started (log {path})", flush=True)
                with open(path, "w") as out:
                    out.write(" ".join(command) + "\n")
                    out.flush()
                    running[member] = (subprocess.Popen(command, stdout=out,
                                                        stderr=subprocess.STDOUT), path)
            done = _wait_any(running)
            proc, path = running.pop(done)
            lines = path.read_text().strip().splitlines()
            if proc.returncode != 0:
                error = next((x for x in reversed(lines) if x.startswith("error:")),
                             lines[-1] if lines else "")
                failed.append(f"{done} ({error.removeprefix('error: ')}; log: {path})")
                if proc.returncode == 130:
                    raise KeyboardInterrupt
            else:
                shown = next((x for x in lines if x.startswith("trained ")), "finished")
                print(f"ensemble member {done}: {shown}", flush=True)
    finally:
        for proc, _ in running.values():  # interrupted: stop the members still training
            proc.terminate()
        for proc, _ in running.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if failed:
        raise ModelError(f"ensemble member {failed[0]}")
    return tracker.child_runs(parent, "train")


def _wait_any(running: dict[str, tuple[subprocess.Popen, Path]]) -> str:
    """The member whose process ends first."""
    while True:
        for member, (proc, _) in running.items():
            if proc.poll() is not None:
                return member
        time.sleep(0.5)


def _check_members(bundles: dict[str, Bundle], data: PreparedData) -> None:
    """Every member must read the same channels with the same scaling as the ensemble."""
    for name, b in bundles.items():
        same = (list(b.channels) == list(data.channels) and np.allclose(
            b.scaler.mean, data.scaler.mean) and np.allclose(b.scaler.std, data.scaler.std))
        if not same:
            raise ModelError(f"model.members: member {name!r} was trained on other channels or "
                             "another scaling than the ensemble's data; its overrides must not "
                             "change the data")


def ensemble_net_config(cfg: DictConfig, bundles: dict[str, Bundle], scheme: str) -> dict:
    return {"_target_": ENSEMBLE_TARGET, "_recursive_": False, "_convert_": "all",
            "horizon": int(cfg.data.horizon), "scheme": scheme,
            "members": [{"name": n, "net": b.net_config} for n, b in bundles.items()]}


def log_fit(fit: CombinationFit, names: list[str], tracker: Tracker) -> None:
    """The weights (per lead time as series), the scheme and the validation numbers."""
    metrics = {"val/ensemble_mse": fit.val_mse, "val/ensemble_windows": fit.windows,
               "val/ensemble_holdout_windows": fit.holdout_windows}
    for k, name in enumerate(names):
        metrics[f"ensemble/weight_{name}_first"] = float(fit.horizon_weights[0, k])
        metrics[f"ensemble/weight_{name}_last"] = float(fit.horizon_weights[-1, k])
        metrics[f"ensemble/step_weight_{name}"] = float(fit.step_weights[k])
        metrics[f"val/ensemble_member_mse_{name}"] = float(fit.val_mse_each[k])
        tracker.log_series(f"ensemble/weight_{name}_by_lead", fit.horizon_weights[:, k],
                           first_step=1)
    for scheme, value in fit.holdout_mse.items():
        metrics[f"val/ensemble_holdout_mse_{scheme}"] = value
    tracker.log_metrics(metrics)
    tracker.set_tags({"tsssm.ensemble.scheme": fit.scheme,
                      "tsssm.ensemble.members": ",".join(names)})


def train_ensemble(cfg: DictConfig, overrides: list[str] | None) -> str:
    """Run `tsssm train model=ensemble`; returns the ensemble's MLflow run id."""
    from tsssm.commands.train import (
        calibrate,
        log_evaluation,
        print_summary,
        publish,
        run_identity,
    )

    if overrides is None:
        raise ConfigError("model=ensemble composes its members from the command's overrides; "
                          "call train(cfg, overrides) (the CLI, `tsssm run` and tsssm.train "
                          "do)")
    if cfg.parent_run:
        raise ConfigError("model.members: an ensemble cannot be a member of another ensemble")
    seed_everything(cfg.seed)
    tracker = Tracker.from_config(cfg.tracking)
    with tracker.start(*run_identity(cfg)) as run:
        log.info("tsssm train: MLflow run %s (%s), an ensemble of %s", run.run_id, tracker.uri,
                 ", ".join(cfg.model.members))
        data = build_dataset(cfg.data).load()
        started = time.perf_counter()
        if cfg.model.jobs > 1:
            member_runs = _train_in_processes(cfg, overrides, run.run_id, tracker)
        else:
            member_runs = _train_in_process(cfg, overrides, run.run_id)
        missing = [m for m in cfg.model.members if m not in member_runs]
        if missing:
            raise ModelError(f"model.members: no finished training of member {missing[0]!r} "
                             f"under run {run.run_id}")
        # the members' bundles, as their runs published them
        bundles = {m: load_bundle(Path(cfg.tracking.output_dir) / "models" / member_runs[m])
                   for m in cfg.model.members}
        _check_members(bundles, data)
        members_s = time.perf_counter() - started
        net_cfg = ensemble_net_config(cfg, bundles, "unfitted")
        net = build_net(net_cfg, len(data.channels))
        for member, b in zip(net.members, bundles.values()):
            member.load_state_dict(b.model.state_dict())
        net = place_members(net, _device(cfg)).eval()
        fit_data = data.without_labelled() if labelled_training_rows(cfg.task, data) else data
        # the combination sees the validation windows only (tsssm.tasks.combine)
        fit = fit_combination(net, fit_data, cfg.data.input_len, cfg.data.horizon,
                              cfg.data.eval_stride, option_value(cfg.model.weights),
                              cfg.model.blocks, cfg.model.holdout,
                              option_value(cfg.data.future_inputs), cfg.score.chunk_size)
        net_cfg["scheme"] = fit.scheme
        fit_s = time.perf_counter() - started - members_s
        log.info("members trained in %.0f s; weights (%s) fitted on the validation windows in "
                 "%.0f s", members_s, fit.scheme, fit_s)
        tracker.log_metrics({"train/members_s": members_s, "train/combine_fit_s": fit_s})
        log_fit(fit, list(cfg.model.members), tracker)
        tracker.set_tags({f"tsssm.member.{m}": r for m, r in member_runs.items()})
        calibrate(cfg, net, fit_data, tracker)
        with staging(cfg.tracking.output_dir, run.run_id) as folder:
            ev = log_evaluation(cfg, net, data, tracker, folder,
                                f"{cfg.model.name} on {cfg.data.name}")
            model_dir = publish(cfg, net, net_cfg, data, ev, tracker, folder)
        print_summary(cfg, run.run_id, ev.metrics, model_dir, tracker)
        _print_members(cfg, fit, member_runs, tracker)
        return run.run_id


def _print_members(cfg: DictConfig, fit: CombinationFit, member_runs: dict[str, str],
                   tracker: Tracker) -> None:
    key = f"test/h{cfg.data.horizon}_mse"
    held = ", ".join(f"{s} {v:.4f}" for s, v in fit.holdout_mse.items())
    why = (f", chosen on the last {fit.holdout_windows}: {held}" if held else
           "; too few validation windows to hold some out, so one vector"
           if option_value(cfg.model.weights) == "auto" else "")
    print(f"  weights ({fit.scheme}; fitted on {fit.windows} validation windows{why}):")
    for k, m in enumerate(cfg.model.members):
        metric = tracker.run_metrics(member_runs[m]).get(key, float("nan"))
        print(f"    {m}: lead 1 {fit.horizon_weights[0, k]:.2f}, lead {cfg.data.horizon} "
              f"{fit.horizon_weights[-1, k]:.2f}, one-step {fit.step_weights[k]:.2f}; "
              f"alone {key}={metric:.4f} (run {member_runs[m]})")
