"""Which variance calibration, chosen on VALIDATION only (issue 7, item 4: test coverage of the
±1.96σ band must be in 90-98 % at every horizon).

Step 1 (``--dump``): fit a model (kalman_ett by the pipeline's own fitting, or a short Mamba run
of benchmarks/ett_dev.py's recipe loaded from --load) and save its raw val and test forecasts
(mean, var, target) with each window's context volatility to an .npz.
Step 2 (default): fit every candidate of CANDIDATES on the first half of the validation windows
(those whose targets end before the second half starts), score the ±1.96σ coverage error
(mean over leads of |cov_h - 0.95|) and CRPS on the second half, pick the winner by RULE, then
refit every candidate on all validation windows and report test coverage / CRPS (printed for the
record; nothing from test chooses anything).

The candidates and the rule were fixed before any run (2026-12-02):
- coverage: s_h = (q95(|z|) / 1.96)^2 per lead (the current task.calibration=coverage)
- recent: the same, fitted on the later half of the fitting windows only
- channel: the same per lead and channel
- volatility: var * s_h * (r / r_fit)^b, r the window's context realised volatility (mean squared
  first difference of the context, per channel), b from B_GRID by the Gaussian NLL on the fitting
  windows (with the per-lead ML factor), then s_h by the coverage quantile of z^2 / (r/r_fit)^b
RULE: the winner has the lowest validation-half coverage error among candidates whose
validation-half CRPS is at most 1.005 x coverage's; coverage wins ties.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsssm.tasks.forecast_metrics import Z95, gaussian_crps  # noqa: E402

B_GRID = np.round(np.linspace(-0.5, 1.5, 21), 3)
CANDIDATES = ("coverage", "recent", "channel", "volatility")


def context_vol(values: np.ndarray, origins: np.ndarray, L: int) -> np.ndarray:
    """(N, C) mean squared first difference of each window's L context rows."""
    d2 = np.diff(values, axis=0, prepend=values[:1]) ** 2
    d2 = np.nan_to_num(d2)
    cs = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(d2, axis=0)])
    return (cs[origins] - cs[origins - L + 1]) / (L - 1)


def dump(args) -> None:
    import torch

    from tsssm.tasks.evaluate import forecast_origins

    if args.model == "kalman_ett":
        sys.argv = [sys.argv[0]]
        from benchmarks.kalman_ett import load, run_kalman

        cfg, data = load(args.data, args.root, args.horizon, [])
        _, model = run_kalman(cfg, data, args.horizon)
    else:
        from benchmarks.ett_dev import load
        from tsssm.bundle import build_net

        data = load(args.data, args.root, 96, args.horizon)
        net_cfg = {"_target_": "tsssm.models.mamba_forecaster.MambaForecaster",
                   "horizon": args.horizon, "input_len": 96, "scan_backend": "torch",
                   **json.loads(args.net)}
        model = build_net(net_cfg, len(data.channels))
        model.load_state_dict(torch.load(args.load))
        model.var_calibration.scale.fill_(1.0)
        model.eval()
    part = data.parts[0]
    out = {}
    with torch.no_grad():
        for split in ("val", "test"):
            pred, tg, org = forecast_origins(model, part.stream.values, part.rows(split), 96,
                                             args.horizon, 1)
            out[f"{split}_mean"] = pred.mean.numpy().astype(np.float32)
            out[f"{split}_var"] = pred.var.numpy().astype(np.float32)
            out[f"{split}_target"] = tg.astype(np.float32)
            out[f"{split}_origin"] = org
            out[f"{split}_vol"] = context_vol(part.stream.values.astype(np.float64), org, 96)
    np.savez(args.out, **out)
    print("saved", args.out)


def crps(e: np.ndarray, sd: np.ndarray) -> float:
    """Mean Gaussian CRPS of errors e with standard deviations sd (the task's own formula)."""
    return float(np.nanmean(gaussian_crps(e, 0.0, sd)))


def fit(name: str, z2: np.ndarray, vol: np.ndarray) -> dict:
    """Fit candidate ``name`` on z2 (N, H, C) with context volatilities vol (N, C)."""
    q = lambda a, ax: np.nanquantile(a, 0.95, axis=ax) / Z95**2  # noqa: E731
    if name == "coverage":
        return {"s": q(z2.transpose(1, 0, 2).reshape(z2.shape[1], -1), 1)[None, :, None]}
    if name == "recent":
        return fit("coverage", z2[len(z2) // 2:], vol)
    if name == "channel":
        return {"s": q(z2, 0)[None]}
    if name == "volatility":
        lv = np.log(vol + 1e-12)
        ref = lv.mean(axis=0)  # (C,)
        best = None
        for b in B_GRID:
            f = np.exp(b * (lv - ref))[:, None, :]  # (N, 1, C)
            w = z2 / f
            s = np.nanmean(w, axis=(0, 2))[None, :, None]
            nll = np.nanmean(np.log(s * f) + w / s)
            if best is None or nll < best[0]:
                best = (nll, b)
        b = best[1]
        f = np.exp(b * (lv - ref))[:, None, :]
        s = fit("coverage", z2 / f, vol)["s"]
        return {"s": s, "b": float(b), "ref": ref}
    raise ValueError(name)


def factor(p: dict, vol: np.ndarray) -> np.ndarray:
    if "b" in p:
        return p["s"] * np.exp(p["b"] * (np.log(vol + 1e-12) - p["ref"]))[:, None, :]
    return p["s"]


def score(p: dict, e, var, vol) -> dict:
    v = var * factor(p, vol)
    z2 = e**2 / v
    cov_h = np.nanmean(z2 <= Z95**2, axis=(0, 2))
    return {"cov": float(np.nanmean(z2 <= Z95**2)), "cov_err": float(np.abs(cov_h - 0.95).mean()),
            "cov_min": float(cov_h.min()), "cov_max": float(cov_h.max()),
            "crps": crps(e, np.sqrt(v)), "mse": float(np.nanmean(e**2))}


def study(path: str) -> dict:
    d = np.load(path)
    H = d["val_mean"].shape[1]
    ev = d["val_target"].astype(np.float64) - d["val_mean"]
    et = d["test_target"].astype(np.float64) - d["test_mean"]
    vv, vt = d["val_var"].astype(np.float64), d["test_var"].astype(np.float64)
    org = d["val_origin"]
    cut = org[len(org) // 2]
    a = org + H <= cut  # fitting windows: targets end before the second half's first origin
    b = org >= cut
    res = {"H": H, "raw": {"val": score({"s": np.ones((1, H, 1))}, ev, vv, d["val_vol"]),
                           "test": score({"s": np.ones((1, H, 1))}, et, vt, d["test_vol"])},
           "z_rms_by_channel": {"val": np.sqrt(np.nanmean(ev**2 / vv, axis=(0, 1))).round(3)
                                .tolist(),
                                "test": np.sqrt(np.nanmean(et**2 / vt, axis=(0, 1))).round(3)
                                .tolist()},
           "context_vol_mean": {"val": d["val_vol"].mean(0).round(4).tolist(),
                                "test": d["test_vol"].mean(0).round(4).tolist()},
           "selection": {}, "test": {}}
    for name in CANDIDATES:
        p = fit(name, (ev[a] ** 2 / vv[a]), d["val_vol"][a])
        res["selection"][name] = score(p, ev[b], vv[b], d["val_vol"][b])
    base = res["selection"]["coverage"]
    ok = [n for n in CANDIDATES if res["selection"][n]["crps"] <= 1.005 * base["crps"]]
    winner = min(ok, key=lambda n: (res["selection"][n]["cov_err"], n != "coverage"))
    res["winner"] = winner
    for name in CANDIDATES:
        p = fit(name, ev**2 / vv, d["val_vol"])
        res["test"][name] = {"val": score(p, ev, vv, d["val_vol"]),
                             "test": score(p, et, vt, d["test_vol"])}
        if name == "coverage":
            res["test"][name]["factors_q"] = p["s"][0, [0, H // 4, H // 2, 3 * H // 4, H - 1],
                                                    0].round(3).tolist()
        if "b" in p:
            res["test"][name]["b"] = p["b"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", action="store_true")
    ap.add_argument("--model", default="kalman_ett")
    ap.add_argument("--data", default="ett_h1")
    ap.add_argument("--root", default="/work/shared/datasets/ett")
    ap.add_argument("--horizon", type=int, default=96)
    ap.add_argument("--net", default='{"head": "flatten"}')
    ap.add_argument("--load", default="")
    ap.add_argument("--out", default="/tmp/cov/forecasts.npz")
    ap.add_argument("--record", default="", help="append the study records to this JSON")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    if args.dump:
        dump(args)
        return
    import platform
    from datetime import datetime, timezone

    records = []
    for f in args.files:
        r = study(f)
        r.update(file=Path(f).name, date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                 machine=f"{platform.node()} CPU", command=" ".join(sys.argv))
        records.append(r)
        print(f, json.dumps(r))
    if args.record:
        Path(args.record).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
