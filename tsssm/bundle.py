"""The fitted model as one folder: weights, how to rebuild it, its scalers and its threshold.

``bundle/model.safetensors`` holds the weights (safetensors: tensors only, nothing executable);
``bundle/meta.json`` the net's config, the channels, scaling, threshold, score kind, the
data-reading config, the tsssm version that wrote it and the bundle format. Loading a bundle
never unpickles anything, and the net it rebuilds must be one of tsssm's own model classes, so a
bundle received from someone else runs no code of theirs.

Format history: 1 = ``model.pt`` (a torch pickle of the state dict and net config; still read,
with ``torch.load(weights_only=True)``), 2 = safetensors + JSON (written now).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tsssm import __version__
from tsssm.anomaly.thresholds import Threshold, threshold_from_dict
from tsssm.data.scaling import StandardScaler
from tsssm.errors import ModelError
from tsssm.models.ensemble import ENSEMBLE_TARGET, check_member_config, net_config_problem

FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
META = "meta.json"
_LEGACY_WEIGHTS = "model.pt"  # format 1


@dataclass
class Bundle:
    model: torch.nn.Module
    net_config: dict[str, Any]
    model_name: str
    channels: list[str]
    scaler: StandardScaler  # pooled training scaler
    per_stream_scaling: bool
    threshold: Threshold | None
    score_kind: str
    data_config: dict[str, Any]
    #: the full score spec (tsssm.anomaly.scores.ScoreSpec.to_dict: kind, window, window kind,
    #: align, reanchor: the shift score's moving reference or None); None: the one-step score
    #: of ``score_kind`` (bundles written before windows)
    score: dict[str, Any] | None = None
    #: "pooled": ``threshold`` flags every stream; "per_stream": a stream is flagged by the same
    #: rule refitted on its own first ``data_config["train_rows"]`` rows' scores
    threshold_scope: str = "pooled"
    #: input columns (data.inputs) the model was trained with, and their pooled scaler
    inputs: list[str] = field(default_factory=list)
    input_scaler: StandardScaler | None = None


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_bundle(bundle: Bundle, folder: str | Path) -> Path:
    """Write the bundle atomically: into a temporary folder, renamed when complete. The folder
    gets the permissions the umask gives a new directory (``mkdtemp`` makes it 0700)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        # clone: safetensors refuses tensors that share storage (views, tied weights)
        state = {k: v.detach().cpu().clone().contiguous()
                 for k, v in bundle.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": str(FORMAT_VERSION)})
        meta = {
            "format": FORMAT_VERSION,
            "tsssm_version": __version__,
            "model_name": bundle.model_name,
            "net_config": bundle.net_config,
            "channels": bundle.channels,
            "scaler": bundle.scaler.to_dict(),
            "per_stream_scaling": bundle.per_stream_scaling,
            "threshold": None if bundle.threshold is None else bundle.threshold.to_dict(),
            "score_kind": bundle.score_kind,
            "data_config": bundle.data_config,
            "score": bundle.score,
            "threshold_scope": bundle.threshold_scope,
            "inputs": bundle.inputs,
            "input_scaler": None if bundle.input_scaler is None else bundle.input_scaler.to_dict(),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():  # safetensors writes its file 0600
            os.chmod(f, 0o666 & ~_umask())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _check_target(net_config: Any, where: Path) -> None:
    """Refuse a net config that would instantiate anything but a tsssm model class."""
    problem = net_config_problem(net_config)  # the only modules allowed: tsssm.models.*
    if problem is not None:
        match problem.kind:
            case "mapping":
                why = "'net_config' must be a mapping; the bundle is corrupt"
            case "target":
                why = (f"the net to build is {problem.detail!r}, not a tsssm model class; "
                       "refusing to load it")
            case _:
                why = (f"net_config.{problem.detail} names a class to build; a tsssm bundle "
                       "never does, refusing to load it")
        raise ModelError(f"{where}: {why}")
    target = net_config["_target_"]
    if target == ENSEMBLE_TARGET:  # its members' nets are built by the ensemble: check each
        members = net_config.get("members")
        if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
            raise ModelError(f"{where}: an ensemble's net_config.members must be a list of "
                             "{name, net}; the bundle is corrupt")
        try:
            for m in members:
                check_member_config(str(m.get("name")), m.get("net"))
        except ModelError as err:
            raise ModelError(f"{where}: {err}") from err


def build_net(net_config: dict[str, Any], n_channels: int) -> torch.nn.Module:
    from hydra.utils import instantiate

    try:
        return instantiate(net_config, n_channels=n_channels)
    except Exception as err:
        cause = err.__cause__ or err
        raise ModelError(f"model.net cannot be built: {cause}") from err


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} cannot be read ({err}); the bundle is truncated or corrupt: "
                         "copy it again or retrain") from err
    if not isinstance(meta, dict):
        raise ModelError(f"{path} is not a tsssm bundle description; copy it again or retrain")
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict from safetensors (format 2) or a weights-only torch file (format 1)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["state_dict"]
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{path} cannot be read safely ({detail}); it is truncated, corrupt "
                         "or holds more than tensors: copy the bundle again or retrain") from err


def bundle_format(folder: Path, meta: dict[str, Any]) -> int:
    """The bundle's format number; a newer one than this tsssm reads is refused."""
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt < 1:
        raise ModelError(f"{folder / META}: bundle format {fmt!r} is not a tsssm format")
    if fmt > FORMAT_VERSION:
        raise ModelError(
            f"{folder}: bundle format {fmt} (written by tsssm {meta.get('tsssm_version', '?')}) "
            f"is newer than this tsssm {__version__} reads (up to {FORMAT_VERSION}); "
            "upgrade tsssm to load it"
        )
    return fmt


def load_bundle(folder: str | Path) -> Bundle:
    folder = Path(folder)
    if folder.is_file():  # the user named a file inside the bundle
        folder = folder.parent
    meta_path = folder / META
    if not meta_path.exists():
        raise ModelError(
            f"{folder} is not a tsssm model bundle (needs {META} and {WEIGHTS}); give the "
            "folder written by `tsssm train` (tsssm_runs/models/<run id>) or model.run_id=..."
        )
    meta = _read_meta(meta_path)
    fmt = bundle_format(folder, meta)
    weights_path = folder / (WEIGHTS if fmt >= 2 else _LEGACY_WEIGHTS)
    if not weights_path.exists():
        raise ModelError(f"{folder} has {META} but no {weights_path.name}; the bundle is "
                         "incomplete: copy it again or retrain")
    try:
        channels = list(meta["channels"])
        net_config = meta["net_config"] if fmt >= 2 else None
        scaler = StandardScaler.from_dict(meta["scaler"])
        threshold = threshold_from_dict(meta["threshold"]) if meta["threshold"] else None
        fields = (meta["model_name"], meta["per_stream_scaling"], meta["score_kind"],
                  meta["data_config"])
        inputs = list(meta.get("inputs") or [])  # bundles without inputs have no such keys
        input_scaler = (StandardScaler.from_dict(meta["input_scaler"])
                        if meta.get("input_scaler") else None)
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{meta_path} lacks or garbles {err}; the bundle is corrupt: copy it "
                         "again or retrain") from err
    state = _read_weights(weights_path)
    if net_config is None:  # format 1 kept the net config beside the weights
        net_config = torch.load(weights_path, map_location="cpu", weights_only=True)["net_config"]
    _check_target(net_config, meta_path)
    model = build_net(net_config, len(channels))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(f"{weights_path} does not fit the net described in {META} "
                         f"({str(err).splitlines()[0]}); the bundle is corrupt") from err
    model.eval()
    model_name, per_stream, score_kind, data_config = fields
    return Bundle(
        model=model,
        net_config=net_config,
        model_name=model_name,
        channels=channels,
        scaler=scaler,
        per_stream_scaling=per_stream,
        threshold=threshold,
        score_kind=score_kind,
        data_config=data_config,
        score=meta.get("score"),
        threshold_scope=meta.get("threshold_scope", "pooled"),
        inputs=inputs,
        input_scaler=input_scaler,
    )
