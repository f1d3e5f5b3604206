"""Development loop for ETT forecasters: train one net config, report val and test h{H} metrics.

Same data, windows, losses and recipe as `tsssm train` (ForecastTask's losses, AdamW, per-epoch
learning-rate decay, early stopping on the validation horizon MSE with the best-validated weights
restored, the variance scale fitted on validation), without Lightning, so that small models can
be iterated on quickly on a CPU. Choose on the VALIDATION columns; test is printed for the record.

    python benchmarks/ett_dev.py --data ett_h1 --horizon 96 \
        --net '{"_target_": "tsssm.models.mamba_forecaster.MambaForecaster", "head": "flatten"}'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from tsssm.bundle import build_net
from tsssm.config import DataConfig
from tsssm.data.datasets import build_dataset
from tsssm.tasks.calibrate import calibrate_horizon_variance, window_origins
from tsssm.tasks.forecast import ForecastTask

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, root: str, input_len: int, horizon: int):
    raw = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    raw.pop("defaults", None)
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)
    cfg.root, cfg.input_len, cfg.horizon = root, input_len, horizon
    return build_dataset(cfg).load()


def metrics(model, values, rows, L, H, stride=1):
    fc, tg = window_origins(model, values, rows, L, H, stride)
    mean, var = fc.mean.numpy().astype(np.float64), fc.var.numpy().astype(np.float64)
    err = tg - mean
    sd = np.sqrt(var)
    z = err / sd
    from scipy.stats import norm

    crps = sd * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))
    return {"mse": float((err**2).mean()), "mae": float(np.abs(err).mean()),
            "crps": float(crps.mean()), "cov95": float((np.abs(z) <= 1.96).mean()),
            "nll": float((0.5 * (np.log(2 * np.pi * var) + z**2)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="ett_h1")
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "datasets" / "ett"))
    ap.add_argument("--horizon", type=int, default=96)
    ap.add_argument("--input-len", type=int, default=96)
    ap.add_argument("--net", default="{}")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-decay", type=float, default=0.5)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--train-stride", type=int, default=1)
    ap.add_argument("--val-stride", type=int, default=1)
    ap.add_argument("--one-step-weight", type=float, default=1.0)
    ap.add_argument("--variance-loss", default="detached")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default="", help="save the trained state_dict here")
    ap.add_argument("--load", default="", help="skip training: load this state_dict")
    ap.add_argument("--max-batches", type=int, default=0, help="per epoch (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    L, H = args.input_len, args.horizon
    data = load(args.data, args.root, L, H)
    part = data.parts[0]
    values = part.stream.values
    net_cfg = {"_target_": "tsssm.models.mamba_forecaster.MambaForecaster", "horizon": H,
               "input_len": L, "scan_backend": "torch", **json.loads(args.net)}
    model = build_net(net_cfg, len(data.channels))
    if hasattr(model, "initialize"):
        model.initialize(torch.from_numpy(values[slice(*part.rows("train"))][None]).float())
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    task = ForecastTask(model, {"name": "adamw", "lr": args.lr, "weight_decay": args.wd},
                        horizon=H, one_step_weight=args.one_step_weight,
                        variance_loss=args.variance_loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.wd)
    a, b = part.rows("train")
    train = torch.from_numpy(np.ascontiguousarray(values[a:b])).float()
    starts = np.arange(0, len(train) - (L + H) + 1, args.train_stride)
    best, best_state, bad = math.inf, None, 0
    t0 = time.time()
    epoch = -1
    if args.load:
        best_state = torch.load(args.load)
    for epoch in range(0 if args.load else args.epochs):
        model.train()
        perm = np.random.permutation(starts)
        n_batches = math.ceil(len(perm) / args.batch)
        if args.max_batches:
            n_batches = min(n_batches, args.max_batches)
        tot = 0.0
        for i in range(n_batches):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            y = torch.stack([train[s : s + L + H] for s in idx])
            out = task.losses({"y": y, "mask": torch.ones(y.shape[:2], dtype=torch.bool)})
            opt.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += float(out["mse_horizon"]) if "mse_horizon" in out else float(out["loss"])
        model.eval()
        val = metrics(model, values, part.rows("val"), L, H, args.val_stride)
        print(f"epoch {epoch}: train mse {tot / n_batches:.4f}  val mse {val['mse']:.4f} "
              f"mae {val['mae']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
        if val["mse"] < best:
            best, bad = val["mse"], 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= args.patience:
                break
        for g in opt.param_groups:
            g["lr"] *= args.lr_decay
    model.load_state_dict(best_state)
    model.eval()
    if args.save:
        torch.save(best_state, args.save)
    train_s = time.time() - t0
    raw_test = metrics(model, values, part.rows("test"), L, H)
    raw_val = metrics(model, values, part.rows("val"), L, H, args.val_stride)
    scale = calibrate_horizon_variance(model, data, L, H, stride=args.val_stride)
    if scale is not None:
        print("variance scale by lead (first, quartiles, last):",
              np.round(scale[[0, H // 4, H // 2, 3 * H // 4, H - 1]], 3))
    val = metrics(model, values, part.rows("val"), L, H)
    test = metrics(model, values, part.rows("test"), L, H)
    rec = {"data": args.data, "H": H, "net": json.loads(args.net), "params": n_params,
           "epochs_run": epoch + 1, "train_s": round(train_s, 1),
           "val": {k: round(v, 4) for k, v in val.items()},
           "test": {k: round(v, 4) for k, v in test.items()},
           "uncalibrated_cov95": {"val": round(raw_val["cov95"], 4),
                                  "test": round(raw_test["cov95"], 4)},
           "args": {k: v for k, v in vars(args).items() if k not in ("net", "root")}}
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
