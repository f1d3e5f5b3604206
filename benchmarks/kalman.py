"""Kalman filter benchmark: tsssm against the Python peers (CPU) and its own methods (GPU).

Same models, same data, one run, float64 log-likelihood agreement beside every time.

CPU (peers: statsmodels, filterpy, pykalman, simdkalman, dynamax, a plain vectorised numpy
filter)::

    python benchmarks/kalman.py --cpu [--out DIR]

tsssm against dynamax (JAX ``jit(vmap(lgssm_filter))``, compiled before timing) on the CPU,
1,000 series x 1,000 steps, local linear trend, float64 and float32, paired and repeated (the
two tools alternate, the ratio is taken pair by pair, medians reported), both for the
log-likelihood alone (``kalman_loglik`` vs ``lgssm_filter(...).marginal_loglik``) and for the
per-step outputs (``kalman_filter`` vs dynamax's filtered means and covariances)::

    python benchmarks/kalman.py --vs-dynamax [--reps 21]

Cases 1 x 100,000 steps, 1,000 x 1,000 and 10,000 x 10,000 (series x steps), local linear trend
(n=2) and a 4-state model (trend + period-3 dummy seasonal). A tool that would take too long on a
case runs on fewer series (or steps) and its time is scaled linearly to the full case; the table
marks such figures "extrap." and says what was run. Each tool first runs once untimed (imports,
the C kernel's build, dynamax's compile); then wall and CPU times (this process, all threads)
are the median of 3 runs, or one run where that run took over 10 CPU seconds. On a shared
machine quote the CPU column: wall time there includes the wait for a core.

GPU (one call: correctness tests first, then the timings)::

    python benchmarks/kalman.py --gpu --out $OUT

runs ``pytest -m gpu tests/kalman/test_fused_triton.py`` (stops on a failure), measures the
device-to-device copy bandwidth, then times kalman_filter method="sequential" / "parallel" /
"fused" on one series of 10^6 and 10^7 steps, and the fused kernel on 10,000 x 10,000 against the
memory floor: bytes of y read and of the results written, over the copy bandwidth.
``--dry-run`` runs that GPU code path on the CPU at tiny sizes (Triton interpreter), to check
the script before spending device time. Results: benchmarks/RESULTS.md, "Kalman filter".
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsssm.kalman import LinearGaussianSSM, kalman_filter, kalman_loglik  # noqa: E402

LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def model_matrices(name: str) -> dict[str, np.ndarray]:
    """F, H, Q, R, m0, P0 (float64) of the two benchmark models."""
    if name == "llt":  # local linear trend: level, slope
        return dict(
            F=np.array([[1.0, 1.0], [0.0, 1.0]]),
            H=np.array([[1.0, 0.0]]),
            Q=np.diag([0.5, 0.01]),
            R=np.array([[2.0]]),
            m0=np.zeros(2),
            P0=np.diag([10.0, 1.0]),
        )
    if name == "seas4":  # level, slope, dummy seasonal of period 3 (two states)
        return dict(
            F=np.array([[1.0, 1.0, 0, 0], [0, 1.0, 0, 0], [0, 0, -1.0, -1.0], [0, 0, 1.0, 0]]),
            H=np.array([[1.0, 0.0, 1.0, 0.0]]),
            Q=np.diag([0.5, 0.01, 0.1, 0.0]),
            R=np.array([[2.0]]),
            m0=np.zeros(4),
            P0=np.diag([10.0, 1.0, 5.0, 5.0]),
        )
    raise ValueError(name)


def simulate(M: dict[str, np.ndarray], S: int, T: int, seed: int = 0) -> np.ndarray:
    """y (S, T) float64 drawn from the model, vectorised over series."""
    rng = np.random.default_rng(seed)
    n = M["F"].shape[0]
    Lq = np.linalg.cholesky(M["Q"] + 1e-12 * np.eye(n))
    x = M["m0"] + rng.standard_normal((S, n)) @ np.linalg.cholesky(M["P0"]).T
    y = np.empty((S, T))
    r = math.sqrt(M["R"][0, 0])
    for t in range(T):
        if t > 0:
            x = x @ M["F"].T + rng.standard_normal((S, n)) @ Lq.T
        y[:, t] = x @ M["H"][0] + r * rng.standard_normal(S)
    return y


def tsssm_model(M, dtype=torch.float64, device="cpu") -> LinearGaussianSSM:
    t = {k: torch.tensor(v, dtype=dtype, device=device) for k, v in M.items()}
    return LinearGaussianSSM(t["F"], t["H"], t["Q"], t["R"], t["m0"], t["P0"])


# --------------------------------------------------------------------------------------------
# The peers: each returns the log-likelihood of every series, float64 (S,)
# --------------------------------------------------------------------------------------------


def run_statsmodels(M, y):
    """statsmodels' Cython filter, one series at a time (a fresh filter each: re-binding data to
    one KalmanFilter object keeps the first series' results)."""
    from statsmodels.tsa.statespace.kalman_filter import KalmanFilter

    n = M["F"].shape[0]
    out = np.empty(len(y))
    for s in range(len(y)):
        kf = KalmanFilter(k_endog=1, k_states=n, k_posdef=n)
        kf.bind(np.ascontiguousarray(y[s]))
        kf["design"], kf["transition"], kf["selection"] = M["H"], M["F"], np.eye(n)
        kf["state_cov"], kf["obs_cov"] = M["Q"], M["R"]
        kf.initialize_known(M["m0"], M["P0"])
        out[s] = kf.loglike()
    return out


def run_filterpy(M, y):
    from filterpy.kalman import KalmanFilter

    n = M["F"].shape[0]
    out = np.empty(len(y))
    for s in range(len(y)):
        kf = KalmanFilter(dim_x=n, dim_z=1)
        kf.F, kf.H, kf.Q, kf.R = M["F"], M["H"], M["Q"], M["R"]
        kf.x, kf.P = M["m0"].reshape(n, 1).copy(), M["P0"].copy()
        ll = 0.0
        for t, z in enumerate(y[s]):
            if t > 0:
                kf.predict()
            kf.update(z)
            ll += kf.log_likelihood
        out[s] = ll
    return out


def run_pykalman(M, y):
    from pykalman import KalmanFilter

    kf = KalmanFilter(
        transition_matrices=M["F"], observation_matrices=M["H"], transition_covariance=M["Q"],
        observation_covariance=M["R"], initial_state_mean=M["m0"],
        initial_state_covariance=M["P0"],
    )
    return np.array([kf.loglikelihood(y[s][:, None]) for s in range(len(y))])


def run_simdkalman(M, y):
    import simdkalman

    kf = simdkalman.KalmanFilter(
        state_transition=M["F"], process_noise=M["Q"], observation_model=M["H"],
        observation_noise=M["R"],
    )
    res = kf.compute(y, 0, initial_value=M["m0"], initial_covariance=M["P0"], smoothed=False,
                     filtered=False, log_likelihood=True)
    # simdkalman leaves out the constant -log(2 pi) / 2 of every observed value: add it back
    return np.asarray(res.log_likelihood) - 0.5 * LOG_2PI * y.shape[1]


def run_numpy(M, y):
    """The plain filter a user would write: a loop over time, vectorised over series."""
    F, H, Q, R = M["F"], M["H"][0], M["Q"], M["R"][0, 0]
    S, T = y.shape
    m = np.broadcast_to(M["m0"], (S, len(F))).copy()
    P = np.broadcast_to(M["P0"], (S, *F.shape)).copy()
    ll = np.zeros(S)
    for t in range(T):
        if t > 0:
            m = m @ F.T
            P = F @ P @ F.T + Q
        PH = P @ H  # (S, n)
        s = PH @ H + R  # (S,)
        v = y[:, t] - m @ H
        K = PH / s[:, None]
        m = m + K * v[:, None]
        P = P - K[:, :, None] * PH[:, None, :]
        ll -= 0.5 * (LOG_2PI + np.log(s) + v * v / s)
    return ll


_DYNAMAX_CACHE: dict = {}


def dynamax_filter(M, dtype: str = "float64", outputs: str = "loglik"):
    """jit(vmap(lgssm_filter)) for model M: y (S, T) -> log-likelihoods (S,) (``"loglik"``) or
    (log-likelihoods, filtered means, filtered covariances) (``"all"``). float64 needs JAX's
    x64 mode, which this switches on (and off again for float32)."""
    key = (id(M), dtype, outputs)
    if key in _DYNAMAX_CACHE:
        return _DYNAMAX_CACHE[key]
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", dtype == "float64")
    from dynamax.linear_gaussian_ssm import (
        ParamsLGSSM,
        ParamsLGSSMDynamics,
        ParamsLGSSMEmissions,
        ParamsLGSSMInitial,
        lgssm_filter,
    )

    jdt = jnp.float64 if dtype == "float64" else jnp.float32
    n = M["F"].shape[0]

    def j(a):
        return jnp.asarray(a, dtype=jdt)

    params = ParamsLGSSM(
        initial=ParamsLGSSMInitial(mean=j(M["m0"]), cov=j(M["P0"])),
        dynamics=ParamsLGSSMDynamics(weights=j(M["F"]), bias=j(np.zeros(n)),
                                     input_weights=j(np.zeros((n, 0))), cov=j(M["Q"])),
        emissions=ParamsLGSSMEmissions(weights=j(M["H"]), bias=j(np.zeros(1)),
                                       input_weights=j(np.zeros((1, 0))), cov=j(M["R"])),
    )
    if outputs == "loglik":
        def one(e):
            return lgssm_filter(params, e).marginal_loglik
    else:
        def one(e):
            post = lgssm_filter(params, e)
            return post.marginal_loglik, post.filtered_means, post.filtered_covariances
    fn = jax.jit(jax.vmap(one))

    def run(y):
        out = fn(jnp.asarray(y[..., None], dtype=jdt))
        jax.block_until_ready(out)
        return out

    _DYNAMAX_CACHE[key] = run
    return run


def run_dynamax(M, y):
    """dynamax's jit(vmap(lgssm_filter)) log-likelihoods, float64 (compiled on first use)."""
    return np.asarray(dynamax_filter(M, "float64")(y), dtype=np.float64)


def run_tsssm(M, y):
    """kalman_loglik: the log-likelihood of every series, as every peer here computes it."""
    ssm = tsssm_model(M)
    out = []
    for s0 in range(0, len(y), 1000):  # 1,000 series a call keeps memory in check at 10^8
        yt = torch.from_numpy(np.ascontiguousarray(y[s0:s0 + 1000]))[..., None]
        out.append(kalman_loglik(ssm, yt).numpy())
    return np.concatenate(out)


PEERS = {
    "tsssm": run_tsssm,
    "statsmodels": run_statsmodels,
    "numpy": run_numpy,
    "simdkalman": run_simdkalman,
    "filterpy": run_filterpy,
    "pykalman": run_pykalman,
    "dynamax": run_dynamax,
}
#: Steps (series x time) each tool may process in one timed run before we scale down; chosen
#: from its speed so that no single run takes much over ~20 s on the 2-core CPU machine.
BUDGET = {
    "tsssm": 2e8, "statsmodels": 1.2e7, "numpy": 2e8, "simdkalman": 2e7, "filterpy": 2e4,
    "pykalman": 5e3, "dynamax": 2e8,
}


def timed(fn, *args, reps=3, long_s=10.0):
    """Median wall time and median CPU time (this process, all threads) of ``reps`` runs (one
    run if the first takes over ``long_s`` CPU seconds). On a shared machine the CPU time is
    the steadier figure: it does not count the time spent waiting for a core."""
    times, cpus, out = [], [], None
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if cpus[0] > long_s:
            break
    return statistics.median(times), statistics.median(cpus), len(times), out


def cpu_bench(out_dir: Path, cases, models, tools) -> list[dict]:
    rows = []
    for model in models:
        M = model_matrices(model)
        for S, T in cases:
            y = simulate(M, S, T, seed=S + T)
            ref = None
            for tool in tools:
                # run a subset when the full case is over the tool's budget: fewer series, or
                # fewer steps of the single series; time scales linearly in series x steps
                s_run, t_run = S, T
                while s_run * t_run > BUDGET[tool] and s_run > 1:
                    s_run = max(1, s_run // 10)
                while s_run * t_run > BUDGET[tool] and t_run > 1000:
                    t_run //= 10
                sub = y[:s_run, :t_run]
                # not timed: imports, the C kernel's build for this model, dynamax's compile
                # for this shape (it compiles per shape)
                PEERS[tool](M, sub if tool == "dynamax" else sub[:1, :1000])
                secs, cpu_secs, nrun, ll = timed(PEERS[tool], M, sub)
                scale = (S * T) / (s_run * t_run)
                if tool == "tsssm":
                    ref = (s_run, t_run, ll)
                # agreement with tsssm on the same series and steps (tsssm runs first, in full)
                if ref is not None and tool != "tsssm":
                    if (s_run, t_run) == ref[0:2]:
                        r = ref[2]
                    elif t_run == ref[1]:
                        r = ref[2][:s_run]
                    else:
                        r = run_tsssm(M, sub)
                    agree = float(abs(ll.sum() - r.sum()) / abs(r.sum()))
                else:
                    agree = float("nan")
                row = dict(model=model, S=S, T=T, tool=tool, seconds=secs * scale,
                           measured_seconds=secs, cpu_seconds=cpu_secs * scale,
                           measured_cpu_seconds=cpu_secs, runs=nrun, ran=f"{s_run}x{t_run}",
                           extrapolated=scale != 1.0, rel_diff_vs_tsssm=agree,
                           loglik=float(ll.sum()))
                rows.append(row)
                print(json.dumps(row), flush=True)
            (out_dir / "kalman_cpu.json").write_text(json.dumps(rows, indent=1))
    return rows


def cpu_table(rows) -> str:
    lines = [
        "| model | case (S x T) | tool | wall (s) | CPU (s) | tool / tsssm, wall | "
        "tool / tsssm, CPU | loglik rel. diff vs tsssm | ran |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["model"], r["S"], r["T"]), {})[r["tool"]] = r
    for (model, S, T), tools in by_case.items():
        ts = tools.get("tsssm")
        for tool, r in tools.items():
            ratio = r["seconds"] / ts["seconds"] if ts else float("nan")
            cpu = r.get("cpu_seconds", float("nan"))
            cpu_ratio = cpu / ts["cpu_seconds"] if ts and "cpu_seconds" in ts else float("nan")
            ext = " (extrap.)" if r["extrapolated"] else ""
            agree = "-" if tool == "tsssm" else f"{r['rel_diff_vs_tsssm']:.1e}"
            ran = r["ran"] + ("" if r["runs"] == 3 else f", {r['runs']} run")
            lines.append(f"| {model} | {S}x{T} | {tool} | {r['seconds']:.3g}{ext} | "
                         f"{cpu:.3g}{ext} | {ratio:.3g}x | {cpu_ratio:.3g}x | {agree} | {ran} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# tsssm vs dynamax on the CPU, paired
# --------------------------------------------------------------------------------------------


def vs_dynamax(out_dir: Path, S: int = 1000, T: int = 1000, reps: int = 21) -> list[dict]:
    """Paired timings of tsssm and dynamax (see the module docstring)."""
    from tsssm.kalman import cpu_kernel

    M = model_matrices("llt")
    y = simulate(M, S, T, seed=S + T)
    rows = []
    for dtype in ("float64", "float32"):
        tdt = torch.float64 if dtype == "float64" else torch.float32
        ssm = tsssm_model(M, tdt)
        yt = torch.from_numpy(y).to(tdt)[..., None]
        for outputs in ("loglik", "all"):
            dyn = dynamax_filter(M, dtype, outputs)
            t0 = time.perf_counter()
            d_out = dyn(y)  # compile + first run
            compile_s = time.perf_counter() - t0
            fn_ours = kalman_loglik if outputs == "loglik" else kalman_filter
            ours = functools.partial(fn_ours, ssm, yt)
            d_ll = np.asarray(d_out if outputs == "loglik" else d_out[0], dtype=np.float64)
            res = ours()  # warm (builds the C kernel on first use)
            t_ll = (res if outputs == "loglik" else res.loglik).double().numpy()
            ref = kalman_filter(tsssm_model(M, torch.float64),
                                torch.from_numpy(y)[..., None]).loglik.numpy()
            ours_s, dyn_s, ours_cpu, dyn_cpu = [], [], [], []
            for r in range(reps):
                pair = [("t", ours), ("d", functools.partial(dyn, y))]
                for name, fn in (pair if r % 2 == 0 else pair[::-1]):
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    (ours_s if name == "t" else dyn_s).append(wall)
                    (ours_cpu if name == "t" else dyn_cpu).append(cpu)
            ratio = [a / b for a, b in zip(ours_s, dyn_s)]
            row = dict(S=S, T=T, dtype=dtype, outputs=outputs, reps=reps,
                       tsssm_s=statistics.median(ours_s), dynamax_s=statistics.median(dyn_s),
                       ratio_median=statistics.median(ratio), ratio_min=min(ratio),
                       ratio_max=max(ratio), dynamax_compile_s=compile_s,
                       tsssm_cpu_s=statistics.median(ours_cpu),
                       dynamax_cpu_s=statistics.median(dyn_cpu),
                       tsssm_compiled_kernel=cpu_kernel.library(tdt) is not None,
                       tsssm_rel_diff_vs_f64=float(abs(t_ll.sum() - ref.sum()) / abs(ref.sum())),
                       dynamax_rel_diff_vs_f64=float(abs(d_ll.sum() - ref.sum())
                                                     / abs(ref.sum())))
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out_dir / "kalman_vs_dynamax.json").write_text(json.dumps(rows, indent=1))
    return rows


def vs_dynamax_table(rows) -> str:
    lines = ["| S x T | dtype | outputs | tsssm wall (ms) | dynamax jit wall (ms) | "
             "tsssm / dynamax wall (median of pairs, min-max) | CPU ms tsssm / dynamax | "
             "loglik rel. diff vs float64: tsssm / dynamax |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['S']}x{r['T']} | {r['dtype']} | {r['outputs']} | {1e3 * r['tsssm_s']:.1f} | "
            f"{1e3 * r['dynamax_s']:.1f} | {r['ratio_median']:.2f} ({r['ratio_min']:.2f}-"
            f"{r['ratio_max']:.2f}) | {1e3 * r['tsssm_cpu_s']:.1f} / "
            f"{1e3 * r['dynamax_cpu_s']:.1f} | {r['tsssm_rel_diff_vs_f64']:.1e} / "
            f"{r['dynamax_rel_diff_vs_f64']:.1e} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def dev_time(fn, dev, reps=3, warmup=1, long_s=5.0):
    """Median seconds of ``reps`` synchronised runs after ``warmup`` (compile) runs; one timed
    run when the warm-up took over ``long_s``."""
    out = None
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    _sync(dev)
    if time.perf_counter() - t0 > long_s:
        reps = 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_ms(fn, dev) -> float:
    """Median milliseconds; CUDA events through triton's do_bench on the GPU."""
    if dev == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=20, rep=200, return_mode="median")
    return dev_time(fn, dev, reps=3)[0] * 1e3


def copy_bandwidth(dev) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    numel = 2**28 if dev == "cuda" else 2**22
    x = torch.empty(numel, dtype=torch.float64, device=dev).normal_()
    z = torch.empty_like(x)
    ms = bench_ms(lambda: z.copy_(x), dev)
    return 2 * 8 * numel / (ms * 1e-3)


def fused_bytes(S, T, n, p, elsize, outputs) -> int:
    """Minimum bytes moved by the fused filter: y read once, each result written once."""
    from tsssm.kalman.fused_triton import KERNEL_OUTPUTS

    per_step = p + sum(KERNEL_OUTPUTS[o](n, p) for o in outputs)
    return S * T * per_step * elsize + S * 8


def gpu_bench(out_dir: Path, dev: str = "cuda", sizes: dict | None = None) -> dict:
    from tsssm.kalman.fused_triton import DEFAULT_OUTPUTS, KERNEL_OUTPUTS, fused_kalman_filter

    sizes = sizes or dict(long=[10**6, 10**7], many=(10_000, 10_000), no_steady=10**4)
    t_start = time.perf_counter()
    res: dict = {"torch": torch.__version__}
    import triton

    res["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)"
    res["triton"] = triton.__version__
    bw = copy_bandwidth(dev)
    res["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        (out_dir / "kalman_gpu.json").write_text(json.dumps(res, indent=1, default=str))

    # --- one long series: sequential vs parallel vs fused ------------------------------------
    M = model_matrices("llt")
    long_rows = []
    res["long"] = long_rows
    for T in sizes["long"]:
        y = torch.from_numpy(simulate(M, 1, T, seed=T)).to(dev)[..., None]
        for dtype in (torch.float64, torch.float32):
            ssm = tsssm_model(M, dtype, dev)
            yd = y.to(dtype)
            row = {"T": T, "dtype": str(dtype).replace("torch.", "")}
            lls = {}
            for method in ("sequential", "parallel", "fused"):
                try:
                    secs, r = dev_time(
                        lambda m=method, ssm=ssm, yd=yd: kalman_filter(ssm, yd, method=m), dev)
                    row[method] = secs
                    lls[method] = float(r.loglik.double().sum())
                except Exception as err:  # noqa: BLE001 - report and keep measuring
                    row[method] = None
                    row[method + "_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                if dev == "cuda":
                    torch.cuda.empty_cache()
            base = lls.get("sequential")
            for method, ll in lls.items():
                row[method + "_loglik"] = ll
                row[method + "_rel_diff_vs_seq"] = abs(ll - base) / abs(base) if base else None
            long_rows.append(row)
            print(json.dumps(row), flush=True)
            save()
    # per-step cost of the step-by-step covariance pass (no steady-state shortcut)
    T4 = sizes["no_steady"]
    y4 = torch.from_numpy(simulate(M, 1, T4, seed=1)).to(dev)[..., None]
    ssm = tsssm_model(M, torch.float64, dev)
    secs, _ = dev_time(lambda: kalman_filter(ssm, y4, steady_state=False), dev, reps=1)
    res["sequential_no_steady"] = {"T": T4, "seconds": secs}
    print(f"sequential, steady_state=False, 1x{T4}: {secs:.3f} s", flush=True)

    # --- many series: fused vs memory floor ----------------------------------------------------
    S, T = sizes["many"]
    res["many_shape"] = [S, T]
    many = []
    res["many"] = many
    for model in ("llt", "seas4"):
        M = model_matrices(model)
        y64 = torch.from_numpy(simulate(M, S, T, seed=7)).to(dev)[..., None]
        n = M["F"].shape[0]
        for dtype in (torch.float32, torch.float64):
            ssm = tsssm_model(M, dtype, dev)
            y = y64.to(dtype)
            elsize = y.element_size()
            variants = [dict()]
            variants.append(dict(steady_state=False))
            if model == "llt" and dtype == torch.float32:
                variants += [dict(missing=0.001), dict(prefetch=2), dict(chunk_mult=2),
                             dict(num_warps=2), dict(fast_log=False), dict(vectorize=False),
                             dict(outputs=("log_liks",)), dict(outputs=("log_liks",),
                                                               steady_state=False),
                             dict(outputs=tuple(KERNEL_OUTPUTS))]
            for kw in variants:
                outs = kw.get("outputs", DEFAULT_OUTPUTS)
                y_run = y
                if "missing" in kw:  # the same data with a fraction of the values missing
                    kw = dict(kw)
                    frac = kw.pop("missing")
                    g = torch.Generator(device=dev).manual_seed(3)
                    y_run = y.clone()
                    y_run[torch.rand(y.shape, generator=g, device=dev) < frac] = math.nan
                    label = {"missing": frac}
                else:
                    label = kw or "default"
                nbytes = fused_bytes(S, T, n, 1, elsize, outs)
                try:
                    fused_kalman_filter(ssm, y_run, **kw)  # compile
                    _sync(dev)
                    ms = bench_ms(
                        lambda kw=kw, ssm=ssm, y=y_run: fused_kalman_filter(ssm, y, **kw), dev)
                    floor_ms = nbytes / bw * 1e3
                    row = dict(model=model, dtype=str(dtype).replace("torch.", ""),
                               variant=label, ms=ms, floor_ms=floor_ms,
                               ratio=ms / floor_ms, GBps=nbytes / (ms * 1e-3) / 1e9)
                except Exception as err:  # noqa: BLE001
                    row = dict(model=model, dtype=str(dtype), variant=label,
                               error=f"{type(err).__name__}: {str(err)[:300]}")
                del y_run
                many.append(row)
                print(json.dumps(row, default=str), flush=True)
                if dev == "cuda":
                    torch.cuda.empty_cache()
            # the default fused run against the float64 sequential filter on 100 series
            r = fused_kalman_filter(ssm, y[:100])
            ref = kalman_filter(tsssm_model(M, torch.float64, dev), y64[:100])
            rel = ((r.loglik.double() - ref.loglik).abs() / ref.loglik.abs()).max()
            many.append(dict(model=model, dtype=str(dtype).replace("torch.", ""),
                             check="loglik vs sequential fp64", max_rel_diff=float(rel)))
            print(json.dumps(many[-1]), flush=True)
            save()
        # the torch sequential filter (float64) on the same data: the GPU path without Triton
        try:
            ssm = tsssm_model(M, torch.float64, dev)
            secs, _ = dev_time(lambda ssm=ssm, y64=y64: kalman_filter(ssm, y64), dev, reps=1)
            many.append(dict(model=model, dtype="float64", variant="torch sequential",
                             ms=secs * 1e3))
        except Exception as err:  # noqa: BLE001
            many.append(dict(model=model, dtype="float64", variant="torch sequential",
                             error=f"{type(err).__name__}: {str(err)[:200]}"))
        print(json.dumps(many[-1], default=str), flush=True)
        del y64
        if dev == "cuda":
            torch.cuda.empty_cache()
        save()
    return res


def gpu_table(res) -> str:
    lines = [f"device: {res['device']}, torch {res['torch']}, triton {res['triton']}, copy "
             f"bandwidth {res['copy_bandwidth_GBps']:.0f} GB/s", "",
             "| T (1 series, LLT) | dtype | sequential (s) | parallel (s) | fused (s) |"
             " parallel speed-up | fused speed-up | loglik rel. diff par / fused vs seq |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["long"]:
        def f(x):
            return "err" if x is None else f"{x:.4g}"
        seq = r.get("sequential")
        sp = seq / r["parallel"] if r.get("parallel") and seq else None
        sf = seq / r["fused"] if r.get("fused") and seq else None
        lines.append(
            f"| {r['T']:.0e} | {r['dtype']} | {f(r['sequential'])} | {f(r['parallel'])} | "
            f"{f(r['fused'])} | {f(sp)}x | {f(sf)}x | "
            f"{f(r.get('parallel_rel_diff_vs_seq'))} / {f(r.get('fused_rel_diff_vs_seq'))} |")
    S, T = res["many_shape"]
    lines += ["", f"| {S} x {T} | dtype | variant | time (ms) | floor (ms) | time / floor |"
              " GB/s |", "|---|---|---|---|---|---|---|"]
    for r in res["many"]:
        if "ms" in r and "floor_ms" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['variant']} | {r['ms']:.3g} | "
                         f"{r['floor_ms']:.3g} | {r['ratio']:.2f} | {r['GBps']:.0f} |")
        elif "ms" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['variant']} | {r['ms']:.4g} | | | |")
        elif "check" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['check']}: {r['max_rel_diff']:.1e}"
                         f" | | | | |")
        else:
            lines.append(f"| {r.get('model')} | {r.get('dtype')} | {r.get('variant')} | "
                         f"{r.get('error')} | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tsssm vs the CPU peers")
    ap.add_argument("--gpu", action="store_true", help="GPU tests, then GPU timings")
    ap.add_argument("--quick", action="store_true", help="smaller cases (smoke test)")
    ap.add_argument("--cases", default=None,
                    help="--cpu cases as SxT,SxT (default 1x100000,1000x1000,10000x10000)")
    ap.add_argument("--no-tests", action="store_true", help="--gpu without the pytest run")
    ap.add_argument("--dry-run", action="store_true",
                    help="--gpu code path on the CPU at tiny sizes (TRITON_INTERPRET=1)")
    ap.add_argument("--vs-dynamax", action="store_true",
                    help="tsssm vs dynamax on the CPU, paired timings")
    ap.add_argument("--reps", type=int, default=21, help="--vs-dynamax pairs")
    ap.add_argument("--tools", default=",".join(PEERS), help="CPU tools, comma-separated")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks")))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, command: "
              f"python benchmarks/kalman.py {' '.join(sys.argv[1:])}")
    print(header, flush=True)
    if args.gpu:
        if args.dry_run:
            os.environ["TRITON_INTERPRET"] = "1"
            res = gpu_bench(out_dir, "cpu", dict(long=[256], many=(40, 64), no_steady=32))
            print("\n" + gpu_table(res))
            return
        if not args.no_tests:
            rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x",
                                  "-p", "no:cacheprovider",
                                  str(ROOT / "tests/kalman/test_fused_triton.py")], cwd=ROOT)
            if rc != 0:
                sys.exit(f"GPU tests failed (exit {rc}): not timing")
        sizes = dict(long=[10**5], many=(2000, 2000), no_steady=1000) if args.quick else None
        res = gpu_bench(out_dir, "cuda", sizes)
        table = gpu_table(res)
        (out_dir / "kalman_gpu_table.md").write_text(header + "\n\n" + table + "\n")
        print("\n" + table)
    if args.vs_dynamax:
        rows = vs_dynamax(out_dir, reps=args.reps)
        table = vs_dynamax_table(rows)
        (out_dir / "kalman_vs_dynamax_table.md").write_text(header + "\n\n" + table + "\n")
        print("\n" + table)
    if args.cpu:
        if args.cases:
            cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
        elif args.quick:
            cases = [(1, 10_000), (100, 1000)]
        else:
            cases = [(1, 100_000), (1000, 1000), (10_000, 10_000)]
        rows = cpu_bench(out_dir, cases, ["llt", "seas4"], args.tools.split(","))
        table = cpu_table(rows)
        (out_dir / "kalman_cpu_table.md").write_text(header + "\n\n" + table + "\n")
        print("\n" + table)


if __name__ == "__main__":
    main()
