"""Checkpoint files written whole: to a temporary name, then renamed over the old one, so a kill
in the middle of a save (even SIGKILL) leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, atomic; beside ``x.ckpt`` it writes ``x.json`` with the
    epoch and global step the checkpoint completed (read without unpickling anything)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        progress = {"epoch": int(checkpoint.get("epoch", -1)),
                    "global_step": int(checkpoint.get("global_step", -1))}
        side = path.with_suffix(".json")
        tmp_side = side.with_name(f".{side.name}.tmp")
        tmp_side.write_text(json.dumps(progress))
        os.replace(tmp_side, side)
