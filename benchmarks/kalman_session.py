"""One GPU call for issue 15's Kalman targets: verify every kernel variant, then time them beside
dynamax in the same run.

From the repository root (PYTHONPATH=. and, for the dynamax columns, jax + dynamax importable;
XLA_PYTHON_CLIENT_PREALLOCATE=false so that JAX and torch share the GPU)::

    python3 benchmarks/kalman_session.py --out $OUT [--budget-s 200] [--workers 8]

1. Verification, in ``--workers`` processes at once (they also fill Triton's cache for the
   timing below): every fused-filter variant that is timed, on a local-linear-trend float32 set
   with a missing value (against the float64 sequential filter) and on a random float64 model
   with 10 % missing values (to 1e-9); every launch shape of the Triton parallel filter on the
   benchmark's model (float64 to 1e-10, float32) and on random models (n 1-4, p 1-2, per-series
   matrices, intercepts, missing values); all outputs pre-filled with NaN; and
   ``pytest -m gpu tests/kalman/test_parallel_triton.py``. A variant that fails is not timed;
   any failure makes the exit status 1 and is printed as ``VERIFY FAIL``.
2. Meanwhile, in the main process: copy bandwidth, the data, dynamax (``jit(vmap(lgssm_filter))``
   on 10,000 x 10,000 float32; its parallel filter on one series of 10^5 and 10^6 steps, float64,
   with ``jax_enable_x64`` read back and its filtered means compared with tsssm's; its
   sequential filter at 10^5 for the log-likelihood), tsssm's torch sequential and parallel.
3. Timing of the verified variants: fused 10,000 x 10,000 float32 (ms, x memory floor, loglik
   error); parallel filter, whole ``kalman_filter(method="parallel")`` call, wall ms (synchronised,
   median of 7) and the kernels alone (``do_bench``).

Writes ``kalman_session.json`` and ``kalman_session.md`` (the table, also printed) under --out.
``--ncu-fused`` (for ``ncu``): one call of the fused default and of the best rotation variant.
``--dry-run``: every code path on the CPU at toy sizes (Triton interpreter, no dynamax timing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

#: Fused-filter variants timed at 10,000 x 10,000 (label, keyword options of fused_kalman_filter).
FUSED = [
    ("default", {}),
    ("prefetch 2", dict(prefetch=2)),
    ("chunk_mult 2", dict(chunk_mult=2)),
    ("rotate 2", dict(rotate=True, prefetch=2)),
    ("rotate 3", dict(rotate=True, prefetch=3)),
    ("rotate 4", dict(rotate=True, prefetch=4)),
    ("rotate 4, chunk_mult 2", dict(rotate=True, prefetch=4, chunk_mult=2)),
    ("ll_chunk", dict(ll_chunk=True)),
    ("rotate 4, ll_chunk", dict(rotate=True, prefetch=4, ll_chunk=True)),
    ("rotate 3, chunk_mult 2, ll_chunk", dict(rotate=True, prefetch=3, chunk_mult=2,
                                              ll_chunk=True)),
    ("2 series/thread", dict(series_per_thread=2)),
    ("2 series/thread, rotate 4, ll_chunk", dict(series_per_thread=2, rotate=True, prefetch=4,
                                                 ll_chunk=True)),
    ("2 warps", dict(num_warps=2)),
    ("2 warps, rotate 4, ll_chunk", dict(num_warps=2, rotate=True, prefetch=4, ll_chunk=True)),
    ("steady_state off, rotate 4", dict(steady_state=False, rotate=True, prefetch=4)),
    ("log_liks only", dict(outputs=("log_liks",))),
    ("log_liks only, rotate 4, ll_chunk", dict(outputs=("log_liks",), rotate=True, prefetch=4,
                                               ll_chunk=True)),
    ("series out", dict(out_layout="series")),
    ("series out, rotate 4, ll_chunk", dict(out_layout="series", rotate=True, prefetch=4,
                                            ll_chunk=True)),
    ("series out, rotate 4, chunk_mult 2, ll_chunk", dict(out_layout="series", rotate=True,
                                                          prefetch=4, chunk_mult=2,
                                                          ll_chunk=True)),
    ("series out, 2 series/thread, rotate 4, ll_chunk", dict(out_layout="series",
                                                             series_per_thread=2, rotate=True,
                                                             prefetch=4, ll_chunk=True)),
    ("log_liks only, series out, rotate 4, chunk_mult 2, ll_chunk", dict(
        outputs=("log_liks",), out_layout="series", rotate=True, prefetch=4, chunk_mult=2,
        ll_chunk=True)),
    ("all 7 outputs", dict(outputs="kernel")),
    ("all 7 outputs, rotate 4, ll_chunk", dict(outputs="kernel", rotate=True, prefetch=4,
                                               ll_chunk=True)),
    ("series out, 2 series/thread, rotate 4, chunk_mult 2, ll_chunk", dict(
        out_layout="series", series_per_thread=2, rotate=True, prefetch=4, chunk_mult=2,
        ll_chunk=True)),
    ("series out, rotate 8, ll_chunk", dict(out_layout="series", rotate=True, prefetch=8,
                                            ll_chunk=True)),
]
#: Launch shapes of the Triton parallel filter (block_t, num_warps; block_c = 256).
PARALLEL = [(128, 4), (256, 2), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 4), (1024, 8)]
PAR_T = (10**5, 10**6)


#: Selections of this run (--fused, --par-launch); None = all.
SELECT: dict = {"fused": None, "parallel": None, "pytest": True}


def fused_list(dry: bool) -> list:
    """The fused variants of this run (a dry run exercises a few of each kind)."""
    if SELECT["fused"] is not None:
        return [(lab, kw) for lab, kw in FUSED if lab in SELECT["fused"]]
    return [FUSED[i] for i in (0, 5, 17, 22)] if dry else FUSED


def parallel_list(dry: bool) -> list:
    if SELECT["parallel"] is not None:
        return SELECT["parallel"]
    return PARALLEL[:2] if dry else PARALLEL


def fused_kw(kw: dict) -> dict:
    from tsssm.kalman.fused_triton import KERNEL_OUTPUTS

    kw = dict(kw)
    if kw.get("outputs") == "kernel":
        kw["outputs"] = tuple(KERNEL_OUTPUTS)
    return kw


def dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def poisoned(fn):
    """fn() with every floating tensor torch.empty makes filled with NaN."""
    real = torch.empty

    def nan_empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    torch.empty = nan_empty
    try:
        return fn()
    finally:
        torch.empty = real


# ------------------------------------------------------------------------------------------------
# verification tasks (worker processes)
# ------------------------------------------------------------------------------------------------


def verify_tasks(dry: bool) -> list[dict]:
    """Every check of the run; the first (pytest) gets worker 0 to itself, the others are dealt
    round-robin to the other workers, the timed variants first."""
    tasks = [{"kind": "pytest"}] if not dry and SELECT["pytest"] else []
    tasks += [{"kind": "parallel", "launch": list(lw), "dtype": dt} for lw in parallel_list(dry)
              for dt in ("float64", "float32")]
    tasks += [{"kind": "fused", "label": lab} for lab, _ in fused_list(dry)]
    tasks += [{"kind": "parallel_random", "n": n, "p": p, "dtype": dt}
              for n, p, dt in ((1, 1, "float64"), (2, 1, "float32"), (3, 2, "float64"),
                               (4, 2, "float64"))]
    return tasks


def _check(ok: bool, what: str, errs: list[str]) -> None:
    if not ok:
        errs.append(what)


def _close(name: str, a, b, tol: float, errs: list[str]) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        errs.append(f"{name}: not finite (unwritten output or a NaN passed)")
        return math.inf
    err = float(((a - b).abs() / (1.0 + b.abs())).max())
    _check(err <= tol, f"{name}: error {err:.2e} > {tol:.0e}", errs)
    return err


def run_task(t: dict, dry: bool) -> dict:
    from tsssm.kalman import kalman_filter

    d = dev()
    errs: list[str] = []
    out = dict(t)
    if t["kind"] == "pytest":
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x",
                            "-p", "no:cacheprovider", "tests/kalman/test_parallel_triton.py"],
                           capture_output=True, text=True, cwd=ROOT, timeout=150)
        out["tail"] = (p.stdout + p.stderr)[-1500:]
        _check(p.returncode == 0, f"pytest rc={p.returncode}", errs)
    elif t["kind"] == "fused":
        import kalman as kb
        from gpu_session import simulate_llt

        from tsssm.kalman.fused_triton import fused_kalman_filter
        kw = fused_kw(dict(FUSED)[t["label"]])
        M = kb.model_matrices("llt")
        S, T = (70, 64) if dry else (512, 4000)
        y64 = torch.from_numpy(simulate_llt(M, S, T, seed=3)).to(d)[..., None]
        y64[5, T // 2, 0] = math.nan
        ref = kalman_filter(kb.tsssm_model(M, torch.float64, d), y64)
        res = poisoned(lambda: fused_kalman_filter(kb.tsssm_model(M, torch.float32, d),
                                                   y64.float(), **kw))
        out["llt_f32_loglik_rel"] = rel(res.loglik, ref.loglik)
        _check(out["llt_f32_loglik_rel"] < 1e-3, f"llt float32 loglik {out['llt_f32_loglik_rel']}",
               errs)
        seq32 = kalman_filter(kb.tsssm_model(M, torch.float32, d), y64.float())
        for name in ("log_liks", "filtered_mean", "innovation", "nis", "filtered_cov"):
            a = getattr(res, name)
            if a is not None:  # float32 of a trend at |y| ~ 1e4: bounded by the float32
                # sequential filter's own error (relative to 1 + |ref|)
                e32 = _close(name, getattr(seq32, name), getattr(ref, name), math.inf, [])
                out[f"llt_f32_{name}_seq32"] = e32
                out[f"llt_f32_{name}"] = _close(name, a, getattr(ref, name),
                                                max(2e-2, 10 * e32), errs)
        # random model, float64, 10 % missing, S not a multiple of the block, T with a tail
        g = torch.Generator().manual_seed(11)
        n, p = 2, 1
        F = torch.randn(n, n, generator=g, dtype=torch.float64)
        F = 0.95 * F / torch.linalg.matrix_norm(F, ord=2)
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        from tsssm.kalman import LinearGaussianSSM

        ssm = LinearGaussianSSM(F, torch.randn(p, n, generator=g, dtype=torch.float64),
                                0.3 * (A @ A.T / n + 0.2 * torch.eye(n, dtype=torch.float64)),
                                torch.tensor([[0.7]], dtype=torch.float64),
                                torch.randn(n, generator=g, dtype=torch.float64),
                                torch.eye(n, dtype=torch.float64) * 2,
                                c=0.1 * torch.randn(n, generator=g, dtype=torch.float64))
        ssm = ssm._replace(**{f: getattr(ssm, f).to(d) for f in ("F", "H", "Q", "R", "m0",
                                                                 "P0", "c")})
        S2, T2 = (40, 37) if dry else (300, 1003)
        y = torch.randn(S2, T2, p, generator=g, dtype=torch.float64).cumsum(1) * 0.2
        y[torch.rand(S2, T2, p, generator=g) < 0.1] = math.nan
        y = y.to(d)
        ref = kalman_filter(ssm, y)
        every = ("all" if kw.get("out_layout") != "series" else
                 ("log_liks", "filtered_mean", "predicted_mean", "innovation", "nis",
                  "predicted_obs_mean"))
        res = poisoned(lambda: fused_kalman_filter(ssm, y, **{**kw, "outputs": every}))
        for name in ("log_liks", "filtered_mean", "filtered_cov", "predicted_mean",
                     "predicted_cov", "innovation", "nis", "predicted_obs_mean"):
            if getattr(res, name) is not None:
                out[f"rand_f64_{name}"] = _close(name, getattr(res, name), getattr(ref, name),
                                                 1e-9, errs)
        out["rand_f64_loglik_rel"] = rel(res.loglik, ref.loglik)
        _check(out["rand_f64_loglik_rel"] < 1e-10, "random float64 loglik", errs)
    elif t["kind"] in ("parallel", "parallel_random"):
        import test_parallel_triton as tp

        from tsssm.kalman.parallel import parallel_kalman_filter
        dt = getattr(torch, t["dtype"])
        if t["kind"] == "parallel":
            bt, nw = t["launch"]
            launch = dict(block_t=bt, num_warps=nw, block_c=256)
            if dry:
                launch = dict(block_t=min(bt, 32), num_warps=1, block_c=4)
            import kalman as kb
            from gpu_session import simulate_llt
            M = kb.model_matrices("llt")
            T = 300 if dry else 20_011
            y64 = torch.from_numpy(simulate_llt(M, 1, T, seed=5)).to(d)[..., None]
            y64[0, 7, 0] = math.nan
            ssm = kb.tsssm_model(M, torch.float64, d)
            cases = [(ssm, y64, "llt")]
        else:
            launch = dict(block_t=32, num_warps=1, block_c=4) if dry else {}
            g = torch.Generator().manual_seed(t["n"] * 10 + t["p"])
            batched = t["n"] == 3
            ssm = tp.random_model(g, t["n"], t["p"], batch=(3,) if batched else ())
            ssm = tp.to(ssm, torch.float64, d)
            y64 = tp.random_y(g, (3, 130 if dry else 7001, t["p"])).to(d)
            cases = [(ssm, y64, "random")]
        for model, y, name in cases:
            ref = kalman_filter(model, y, steady_state=False)
            res = poisoned(lambda model=model, y=y: parallel_kalman_filter(
                tp.to(model, dt, d), y.to(dt), backend="triton", **launch))
            seq = None
            if dt == torch.float32:  # float32 is held to the float32 sequential filter's error
                seq = kalman_filter(tp.to(model, dt, d), y.to(dt), steady_state=False)
            for f in tp.FIELDS:
                tol = 1e-9
                if seq is not None:
                    e32 = _close(f, getattr(seq, f), getattr(ref, f), math.inf, [])
                    tol = max(5e-3, 10 * e32)
                    out[f"{name}_{f}_seq32"] = e32
                out[f"{name}_{f}"] = _close(f, getattr(res, f), getattr(ref, f), tol, errs)
            out[f"{name}_loglik_rel"] = rel(res.loglik, ref.loglik)
            ltol = 1e-10
            if seq is not None:
                out[f"{name}_loglik_rel_seq32"] = rel(seq.loglik, ref.loglik)
                ltol = max(1e-4, 10 * out[f"{name}_loglik_rel_seq32"])
            _check(out[f"{name}_loglik_rel"] < ltol,
                   f"{name} loglik {out[f'{name}_loglik_rel']:.2e} (bound {ltol:.1e})", errs)
    out["ok"] = not errs
    out["errors"] = errs
    return out


def task_key(t: dict) -> str:
    return json.dumps({k: t[k] for k in sorted(t) if k in ("kind", "label", "launch", "dtype",
                                                            "n", "p")})


def worker(index: int, count: int, out: Path, dry: bool) -> None:
    if "tests/kalman" not in sys.path:
        sys.path.insert(0, str(ROOT / "tests" / "kalman"))
    path = out / f"verify_{index}.jsonl"
    tasks = verify_tasks(dry)
    if tasks and tasks[0]["kind"] == "pytest" and count > 1:
        mine = [tasks[0]] if index == 0 else tasks[1:][index - 1::count - 1]
    else:
        mine = tasks[index::count]
    for t in mine:
        t0 = time.time()
        try:
            r = run_task(t, dry)
        except Exception as err:  # noqa: BLE001 - a crash is a failure, reported
            r = dict(t, ok=False, errors=[f"{type(err).__name__}: {str(err)[:400]}"],
                     traceback=traceback.format_exc(limit=5))
        r["seconds"] = time.time() - t0
        r["key"] = task_key(t)
        print(("VERIFY ok   " if r["ok"] else "VERIFY FAIL ") + r["key"]
              + ("" if r["ok"] else f" {r['errors']}") + f" ({r['seconds']:.1f} s)", flush=True)
        with path.open("a") as f:
            f.write(json.dumps(r, default=str) + "\n")


# ------------------------------------------------------------------------------------------------
# timing (main process)
# ------------------------------------------------------------------------------------------------


def wall_ms(fn, reps: int = 7) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def device_ms(fn, names: tuple[str, ...], reps: int = 10) -> tuple[float, float] | None:
    """(ms per call of the CUDA kernels whose name contains one of ``names``, ms per call of
    all CUDA kernels), from torch.profiler over ``reps`` calls: the device's own time, without
    the host's share of a call. None without CUDA or when the profiler fails."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            sync()
        match = total = 0.0
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None)
            if t is None:
                t = getattr(e, "cuda_time_total", 0.0)
            if getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
                continue
            total += t
            if any(nm in e.key for nm in names):
                match += t
        return match / reps / 1e3, total / reps / 1e3
    except Exception:  # noqa: BLE001 - a missing profiler only loses this column
        return None


def dynamax_part(res: dict, y_many, y_long: dict, dry: bool) -> None:
    """dynamax on the same data: vmap'd sequential filter float32, parallel filter float64."""
    import numpy as np
    import peers

    if not peers.dynamax_available():
        res["dynamax"] = {"skipped": "not importable"}
        return
    import jax
    import jax.numpy as jnp
    import kalman as kb

    M = kb.model_matrices("llt")
    dyn: dict = {"jax": jax.__version__, "devices": str(jax.devices())}
    try:
        f = peers.dynamax_filter(M, "float32")
        yj = jnp.asarray(y_many.astype(np.float32))
        secs, ll = peers.jax_time(f, yj, reps=1 if dry else 3)
        dyn["vmap_f32"] = {"ms": secs * 1e3, "loglik": np.asarray(ll, dtype=np.float64)[:100]
                           .tolist(), "dtype": str(ll.dtype)}
    except Exception as err:  # noqa: BLE001
        dyn["vmap_f32"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    from dynamax.linear_gaussian_ssm import lgssm_filter, parallel_inference

    jax.config.update("jax_enable_x64", True)
    dyn["x64"] = bool(jax.config.jax_enable_x64)
    params = peers._dynamax_params(M, jnp.float64)
    par = jax.jit(lambda y: parallel_inference.lgssm_filter(params, y))
    seq = jax.jit(lambda y: lgssm_filter(params, y).marginal_loglik)
    for T, y in y_long.items():
        row: dict = {}
        try:
            yj = jnp.asarray(y[:, None])  # (T, 1) float64
            row["y_dtype"] = str(yj.dtype)
            post = par(yj)
            post.marginal_loglik.block_until_ready()
            ts = []
            for _ in range(3 if dry else 5):
                t0 = time.perf_counter()
                post = par(yj)
                post.filtered_means.block_until_ready()
                ts.append(time.perf_counter() - t0)
            row["parallel_ms"] = statistics.median(ts) * 1e3
            row["parallel_loglik"] = float(post.marginal_loglik)
            row["loglik_dtype"] = str(post.marginal_loglik.dtype)
            row["filtered_means"] = np.asarray(post.filtered_means)
            if T <= 10**5:
                s0 = time.perf_counter()
                row["sequential_loglik"] = float(seq(yj))
                row["sequential_s_incl_compile"] = time.perf_counter() - s0
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        dyn[f"T{T}"] = row
    res["dynamax"] = dyn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("kalman_session_out"))
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--workers", type=int, default=9)
    ap.add_argument("--worker", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--ncu-fused", action="store_true")
    ap.add_argument("--fused", default=None,
                    help="fused variants to run, labels separated by ';' (default: all)")
    ap.add_argument("--par-launch", default=None,
                    help="parallel launch shapes block_t/num_warps, comma-separated")
    ap.add_argument("--par-t", default=None, help="parallel filter lengths, comma-separated")
    ap.add_argument("--no-pytest", action="store_true", help="skip pytest -m gpu")
    args = ap.parse_args()
    SELECT["pytest"] = not args.no_pytest
    global PAR_T
    if args.fused is not None:
        SELECT["fused"] = [x.strip() for x in args.fused.split(";") if x.strip()]
        unknown = [x for x in SELECT["fused"] if x not in dict(FUSED)]
        if unknown:
            ap.error(f"unknown fused variants {unknown}")
    if args.par_launch is not None:
        SELECT["parallel"] = [tuple(int(v) for v in x.split("/"))
                              for x in args.par_launch.split(",") if x]
    if args.par_t is not None:
        PAR_T = tuple(int(float(x)) for x in args.par_t.split(","))
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        worker(args.worker, args.workers, args.out, args.dry_run)
        return
    if args.ncu_fused:
        ncu_fused()
        return
    run(args)


def ncu_fused() -> None:
    import kalman as kb
    from gpu_session import simulate_llt

    from tsssm.kalman.fused_triton import fused_kalman_filter
    M = kb.model_matrices("llt")
    y = torch.from_numpy(simulate_llt(M, 10_000, 10_000, seed=7)).to(dev())[..., None].float()
    ssm = kb.tsssm_model(M, torch.float32, dev())
    for kw in ({}, dict(rotate=True, prefetch=4, ll_chunk=True)):
        fused_kalman_filter(ssm, y, **kw)
        sync()


def run(args) -> None:
    import kalman as kb
    from gpu_session import bench_ms, copy_bandwidth, simulate_llt

    from tsssm.kalman import kalman_filter
    from tsssm.kalman.fused_triton import DEFAULT_OUTPUTS, flat_params, fused_kalman_filter
    from tsssm.kalman.parallel import parallel_kalman_filter
    from tsssm.kalman.parallel_triton import parallel_filter_arrays

    t_start = time.time()
    dry = args.dry_run
    out = args.out
    for f in out.glob("verify_*.jsonl"):
        f.unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests" / "kalman"), os.environ.get("PYTHONPATH", "")]))
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in
              (("fused", args.fused), ("par_launch", args.par_launch), ("par_t", args.par_t))
              if v is not None] + (["--no-pytest"] if args.no_pytest else [])
    procs = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--worker", str(i),
                               "--workers", str(args.workers)] + (["--dry-run"] if dry else [])
                              + passed, env=env, cwd=ROOT)
             for i in range(args.workers)]
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry)"
    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    print(f"[{time.time() - t_start:5.1f}s] {res['device']}, copy bandwidth {bw / 1e9:.0f} GB/s",
          flush=True)
    d = dev()
    M = kb.model_matrices("llt")
    S, T = (64, 64) if dry else (10_000, 10_000)
    y_np = simulate_llt(M, S, T, seed=7)
    y = torch.from_numpy(y_np).to(d)[..., None].float()
    ref100 = kalman_filter(kb.tsssm_model(M, torch.float64, d),
                           torch.from_numpy(y_np[:100]).to(d)[..., None]).loglik
    Ts = (256, 1000) if dry else PAR_T
    y_long = {T_: simulate_llt(M, 1, T_, seed=T_)[0] for T_ in Ts}
    # dynamax while the workers compile and verify
    dynamax_part(res, y_np[..., None], y_long, dry)
    print(f"[{time.time() - t_start:5.1f}s] dynamax done", flush=True)
    ssm64 = kb.tsssm_model(M, torch.float64, d)
    par_rows = []
    for T_ in Ts:
        yl = torch.from_numpy(y_long[T_]).to(d)[None, :, None]
        row = {"T": T_}
        for label, fn in (("sequential", lambda yl=yl: kalman_filter(ssm64, yl)),
                          ("torch parallel", lambda yl=yl: parallel_kalman_filter(
                              ssm64, yl, backend="torch"))):
            row[f"{label} ms"] = wall_ms(fn, reps=1 if dry else 5)
            row[f"{label} loglik"] = float(fn().loglik.sum())
        ref_seq = kalman_filter(ssm64, yl)
        row["_ref_mean"] = ref_seq.filtered_mean[0]
        dm = res.get("dynamax", {}).get(f"T{T_}", {})
        if "parallel_ms" in dm:
            row["dynamax parallel ms"] = dm["parallel_ms"]
            row["dynamax parallel loglik"] = dm["parallel_loglik"]
            fm = torch.from_numpy(dm.pop("filtered_means")).to(d)
            row["dynamax filtered_mean max rel err"] = float(
                ((fm - ref_seq.filtered_mean[0]).abs()
                 / (1 + ref_seq.filtered_mean[0].abs())).max())
            if "sequential_loglik" in dm:
                row["dynamax sequential loglik"] = dm["sequential_loglik"]
        par_rows.append(row)
    print(f"[{time.time() - t_start:5.1f}s] torch rows done; waiting for the workers", flush=True)
    wait_until = t_start + 0.55 * args.budget_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(1.0, wait_until - time.time()))
    verified: dict[str, dict] = {}
    for f in sorted(out.glob("verify_*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            verified[r["key"]] = r
    res["verify"] = list(verified.values())
    failed = [k for k, r in verified.items() if not r["ok"]]
    missing = [task_key(t) for t in verify_tasks(dry) if task_key(t) not in verified]
    res["verify_failed"], res["verify_missing"] = failed, missing
    print(f"[{time.time() - t_start:5.1f}s] verified {len(verified) - len(failed)} ok, "
          f"{len(failed)} FAILED, {len(missing)} unfinished", flush=True)

    def ok(t: dict) -> bool:
        r = verified.get(task_key(t))
        return bool(r and r["ok"])

    # fused 10k x 10k
    ssm32 = kb.tsssm_model(M, torch.float32, d)
    frows = []
    for label, kw0 in fused_list(dry):
        row = {"variant": label}
        if not ok({"kind": "fused", "label": label}):
            row["skipped"] = "not verified"
            frows.append(row)
            continue
        if time.time() - t_start > args.budget_s - 20:
            row["skipped"] = "budget"
            frows.append(row)
            continue
        kw = fused_kw(kw0)
        try:
            fused_kalman_filter(ssm32, y, **kw)
            row["ms"] = bench_ms(lambda kw=kw: fused_kalman_filter(ssm32, y, **kw))
            outs = kw.get("outputs", DEFAULT_OUTPUTS)
            row["floor_ms"] = kb.fused_bytes(S, T, 2, 1, 4, outs) / bw * 1e3
            row["x_floor"] = row["ms"] / row["floor_ms"]
            r = fused_kalman_filter(ssm32, y[:100], **kw)
            row["loglik_rel_err_vs_fp64"] = rel(r.loglik, ref100)
            dm = device_ms(lambda kw=kw: fused_kalman_filter(ssm32, y, **kw), ("_kalman_fused",))
            if dm is not None:
                row["kernel_ms"], row["device_ms"] = dm
                row["kernel_x_floor"] = dm[0] / row["floor_ms"]
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"  fused {row}", flush=True)
        frows.append(row)
    res["fused"] = frows
    vm = res.get("dynamax", {}).get("vmap_f32", {})
    if "ms" in vm:
        tl_ = fused_kalman_filter(ssm32, y[:100]).loglik
        vm["loglik_rel_diff_vs_fused"] = rel(torch.tensor(vm.pop("loglik")), tl_.cpu())
    # parallel, Triton launch shapes
    for row in par_rows:
        T_ = row["T"]
        yl = torch.from_numpy(y_long[T_]).to(d)[None, :, None]
        base = row["sequential loglik"]
        for dt in (torch.float64, torch.float32):
            for bt, nw in parallel_list(dry):
                lab = f"triton {bt}/{nw} {str(dt)[6:]}"
                if not ok({"kind": "parallel", "launch": [bt, nw], "dtype": str(dt)[6:]}):
                    row[f"{lab} ms"] = "not verified"
                    continue
                if time.time() - t_start > args.budget_s - 10:
                    row[f"{lab} ms"] = "budget"
                    continue
                launch = dict(block_t=bt, num_warps=nw, block_c=256)
                if dry:
                    launch = dict(block_t=min(bt, 32), num_warps=1, block_c=4)
                m = kb.tsssm_model(M, dt, d)
                yy = yl.to(dt)
                try:
                    fn = lambda m=m, yy=yy, launch=launch: parallel_kalman_filter(  # noqa: E731
                        m, yy, backend="triton", **launch)
                    row[f"{lab} ms"] = wall_ms(fn, reps=1 if dry else 7)
                    r = fn()
                    row[f"{lab} loglik rel err"] = abs(float(r.loglik.sum()) - base) / abs(base)
                    row[f"{lab} mean max rel err"] = float(
                        ((r.filtered_mean[0].double() - row["_ref_mean"]).abs()
                         / (1 + row["_ref_mean"].abs())).max())
                    params = flat_params(m, (1,))
                    y3 = yy.reshape(1, T_, 1)
                    row[f"{lab} kernels ms"] = bench_ms(
                        lambda y3=y3, params=params, launch=launch: parallel_filter_arrays(
                            y3, params, **launch), rep_ms=50)
                    dm = device_ms(fn, ("_reduce", "_carry", "_final"), reps=5)
                    if dm is not None:
                        row[f"{lab} scan kernels device ms"], row[f"{lab} device ms"] = dm
                except Exception as err:  # noqa: BLE001
                    row[f"{lab} ms"] = f"error {type(err).__name__}: {str(err)[:200]}"
                print(f"  parallel T={T_} {lab}: {row.get(f'{lab} ms')}", flush=True)
        row["torch parallel loglik rel err"] = abs(row["torch parallel loglik"] - base) / abs(base)
        if "dynamax parallel loglik" in row:
            row["dynamax parallel loglik rel err"] = abs(row["dynamax parallel loglik"]
                                                         - base) / abs(base)
        row.pop("_ref_mean")
    res["parallel"] = par_rows
    for p in procs:  # stragglers (pytest): what is left of the budget, then stop them
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(1.0, t_start + args.budget_s - time.time()))
        if p.poll() is None:
            p.kill()
    late = {}
    for f in sorted(out.glob("verify_*.jsonl")):  # checks that ended during the timing
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r["key"] not in verified:
                late[r["key"]] = r
    for key, r in late.items():
        res["verify"].append(r)
        res["verify_missing"] = [k for k in res["verify_missing"] if k != key]
        if not r["ok"]:
            failed.append(key)
            res["verify_failed"] = failed
    res["elapsed_s"] = time.time() - t_start
    (out / "kalman_session.json").write_text(json.dumps(res, indent=1, default=str))
    table = make_table(res)
    (out / "kalman_session.md").write_text(table)
    for f in out.glob("verify_*.jsonl"):  # merged into the JSON
        f.unlink()
    print(table, flush=True)
    if failed:
        print(f"VERIFICATION FAILED: {failed}", flush=True)
        sys.exit(1)


def _f(x, fmt="{:.3g}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else ("" if x is None else str(x))


def make_table(res: dict) -> str:
    L = [f"# Kalman session {res['started']}: {res['device']}, torch {res['torch']}, triton "
         f"{res['triton']}, copy bandwidth {res['copy_bandwidth_GBps']:.0f} GB/s", ""]
    nv = len(res["verify"])
    L.append(f"verified {nv - len(res['verify_failed'])} of {nv} tasks; failed "
             f"{res['verify_failed']}; unfinished {res['verify_missing']}")
    for r in res["verify"]:
        if r.get("kind") == "pytest":
            L.append("pytest -m gpu: " + r.get("tail", "").strip().splitlines()[-1]
                     if r.get("tail") else "pytest: no output")
    L += ["", "## Fused filter, LLT float32, 10,000 x 10,000", "",
          "| variant | call ms | x floor | kernel ms | kernel x floor | device ms | loglik rel err "
          "vs fp64 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res.get("fused", []):
        L.append(f"| {r['variant']} | {_f(r.get('ms', r.get('skipped', r.get('error'))))} | "
                 f"{_f(r.get('x_floor'), '{:.2f}')} | {_f(r.get('kernel_ms'))} | "
                 f"{_f(r.get('kernel_x_floor'), '{:.2f}')} | {_f(r.get('device_ms'))} | "
                 f"{_f(r.get('loglik_rel_err_vs_fp64'), '{:.1e}')} |")
    dyn = res.get("dynamax", {})
    L.append(f"\ndynamax: {json.dumps({k: v for k, v in dyn.items() if not k.startswith('T')})}")
    best = [r for r in res.get("fused", []) if "ms" in r and r["variant"] in dict(FUSED)
            and "outputs" not in dict(FUSED)[r["variant"]]]
    if best and "ms" in dyn.get("vmap_f32", {}):
        b = min(best, key=lambda r: r["ms"])
        L.append(f"best default-output variant: {b['variant']} {b['ms']:.3g} ms = "
                 f"{b['x_floor']:.2f}x floor, dynamax/fused = "
                 f"{dyn['vmap_f32']['ms'] / b['ms']:.0f}x")
    L += ["", "## Parallel-in-time filter, one LLT series (wall ms of the whole call; kernels ms; "
          "loglik rel err vs the sequential filter)", ""]
    for r in res.get("parallel", []):
        L.append(f"### T = {r['T']:,}")
        L.append("| method | ms | kernels ms | scan kernels device ms | all device ms | "
                 "loglik rel err | filtered mean err |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        L.append(f"| sequential f64 | {_f(r.get('sequential ms'))} | | | | 0 | |")
        L.append(f"| torch parallel f64 | {_f(r.get('torch parallel ms'))} | | | | "
                 f"{_f(r.get('torch parallel loglik rel err'), '{:.1e}')} | |")
        L.append(f"| dynamax parallel f64 | {_f(r.get('dynamax parallel ms'))} | | | | "
                 f"{_f(r.get('dynamax parallel loglik rel err'), '{:.1e}')} | "
                 f"{_f(r.get('dynamax filtered_mean max rel err'), '{:.1e}')} |")
        for k in sorted(k for k in r if k.startswith("triton") and k.endswith(" ms")
                        and "kernels" not in k):
            lab = k[:-3]
            L.append(f"| {lab} | {_f(r[k])} | {_f(r.get(lab + ' kernels ms'))} | "
                     f"{_f(r.get(lab + ' scan kernels device ms'))} | "
                     f"{_f(r.get(lab + ' device ms'))} | "
                     f"{_f(r.get(lab + ' loglik rel err'), '{:.1e}')} | "
                     f"{_f(r.get(lab + ' mean max rel err'), '{:.1e}')} |")
        L.append(f"(sequential loglik {r.get('sequential loglik')}; dynamax parallel "
                 f"{r.get('dynamax parallel loglik')}; dynamax sequential "
                 f"{r.get('dynamax sequential loglik')})")
    for k, v in dyn.items():
        if k.startswith("T"):
            L.append(f"dynamax {k}: " + json.dumps({a: b for a, b in v.items()
                                                    if a != "filtered_means"}))
    L.append(f"\nelapsed {res['elapsed_s']:.0f} s")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
