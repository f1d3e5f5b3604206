"""The fitted model as one folder: weights, how to rebuild it, its scalers and its threshold.

``bundle/model.pt`` holds the state dict and the net's config (with ``_target_``);
``bundle/meta.json`` the channels, scaling, threshold, score kind and the data-reading config,
so `tsssm score` applies exactly the training-time preprocessing to new data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tsssm.anomaly.thresholds import Threshold, threshold_from_dict
from tsssm.data.scaling import StandardScaler
from tsssm.errors import ModelError

FORMAT_VERSION = 1


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


def save_bundle(bundle: Bundle, folder: str | Path) -> Path:
    """Write the bundle atomically: into a temporary folder, renamed when complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=folder.parent))
    try:
        torch.save(
            {
                "format": FORMAT_VERSION,
                "state_dict": {k: v.detach().cpu() for k, v in bundle.model.state_dict().items()},
                "net_config": bundle.net_config,
            },
            tmp / "model.pt",
        )
        meta = {
            "format": FORMAT_VERSION,
            "model_name": bundle.model_name,
            "channels": bundle.channels,
            "scaler": bundle.scaler.to_dict(),
            "per_stream_scaling": bundle.per_stream_scaling,
            "threshold": None if bundle.threshold is None else bundle.threshold.to_dict(),
            "score_kind": bundle.score_kind,
            "data_config": bundle.data_config,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def build_net(net_config: dict[str, Any], n_channels: int) -> torch.nn.Module:
    from hydra.utils import instantiate

    try:
        return instantiate(net_config, n_channels=n_channels)
    except Exception as err:
        cause = err.__cause__ or err
        raise ModelError(f"model.net cannot be built: {cause}") from err


def load_bundle(folder: str | Path) -> Bundle:
    folder = Path(folder)
    if folder.is_file():  # the user named model.pt inside the bundle
        folder = folder.parent
    meta_path, weights_path = folder / "meta.json", folder / "model.pt"
    if not meta_path.exists() or not weights_path.exists():
        raise ModelError(
            f"{folder} is not a tsssm model bundle (needs meta.json and model.pt); give the "
            "folder written by `tsssm train` (tsssm_runs/models/<run id>) or model.run_id=..."
        )
    meta = json.loads(meta_path.read_text())
    blob = torch.load(weights_path, map_location="cpu", weights_only=False)
    if meta.get("format") != FORMAT_VERSION:
        raise ModelError(f"{folder}: bundle format {meta.get('format')} is not supported")
    model = build_net(blob["net_config"], len(meta["channels"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    threshold = threshold_from_dict(meta["threshold"]) if meta["threshold"] else None
    return Bundle(
        model=model,
        net_config=blob["net_config"],
        model_name=meta["model_name"],
        channels=meta["channels"],
        scaler=StandardScaler.from_dict(meta["scaler"]),
        per_stream_scaling=meta["per_stream_scaling"],
        threshold=threshold,
        score_kind=meta["score_kind"],
        data_config=meta["data_config"],
    )
