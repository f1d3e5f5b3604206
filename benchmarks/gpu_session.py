"""One GPU session: the kernels' correctness tests, then tsssm's scan and Kalman kernels timed side
by side with the peers (mamba-ssm's CUDA scan, dynamax) and their memory floors, in one run.

Run by ``benchmarks/gpu_session.sh`` (which builds mamba-ssm's extension in the background), from
the repository root with ``PYTHONPATH=.``::

    python3 benchmarks/gpu_session.py --out $OUT [--budget-s 480] [--mamba-build DIR]

Order (every section catches its own failure, reports it and goes on; each runs only while the
budget leaves it time, the most important first):

1. copy bandwidth (for every floor of this run); ``pytest -m gpu`` on the kernel tests and, at
   the same time, worker processes that compile and verify every scan launch shape that will be
   timed (forward and every gradient against the float64 torch path; a shape that fails is not
   timed), so the timing sections below hit Triton's cache; the scan table's variants first;
2. scan sweep at L=16k (bf16, fp32), at most 40 s each, only the shapes the workers compiled
   and verified: forward shapes, then forward+backward shapes and the three ways of reducing
   dB/dC (partial sums, acq_rel atomics, relaxed atomics);
3. scan table: batch 8, dim 1024, N 16, z, D, delta_bias, softplus; L = 1k, 16k, 64k; bf16 and
   fp32; variants "old" (the kernel of 2026-11-22), "new" (this branch's defaults), "swept" (the
   sweep's best) and mamba-ssm (its own section, right after the table when the build has
   finished, else after the Kalman sections): time, ratio, floor, peak memory, agreement of
   the output and of every gradient with tsssm's;
4. fused Kalman filter, 10,000 series x 10,000 steps, local linear trend, float32: variants vs
   the memory floor, dynamax ``jit(vmap(lgssm_filter))``, the differentiable path (forward +
   adjoint kernel) vs torch autograd; the parallel-in-time filter vs dynamax's, one series of
   10^5 and 10^6 steps, float64, with the log-likelihood error against the sequential filter;
5. Mamba forecaster training throughput with tsssm's kernel vs mamba-ssm's.

Writes ``session_results.json`` (everything, rewritten after every section) and
``session_table.md`` (the compact table, also printed last) under --out. ``--dry-run`` runs
every section's code path on the CPU at toy sizes (Triton interpreter, no peers' GPU parts);
``--sections a,b`` runs only those; ``--table-only`` rebuilds the table from an --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from scan_configs import BWD_SWEEP, FWD_SWEEP  # noqa: E402

#: The scan kernel of 2026-11-22 (what the issue's table measured).
#: (The kernel switches added since are spelled out off: scan_variant merges over the module's
#: current defaults.)
OLD = dict(fwd=dict(BLOCK_D=16, BLOCK_L=64, num_warps=4, UNROLL=4, PREFETCH=0, BC_2D=0),
           bwd=dict(BLOCK_D=4, num_warps=1, UNROLL=2, PREFETCH=0, BC_2D=0, STATE_PREFETCH=0),
           atomic="auto", sem="acq_rel")
#: Training forward shapes the backward sweep pairs with (one per chunk length).
TRAIN_FWD = [dict(BLOCK_D=16, BLOCK_L=64, num_warps=4, UNROLL=4, PREFETCH=1),
             dict(BLOCK_D=16, BLOCK_L=32, num_warps=2, UNROLL=4, PREFETCH=1)]


# ------------------------------------------------------------------------------------------------
# The session: budget, results, sections
# ------------------------------------------------------------------------------------------------


class Session:
    def __init__(self, out: Path, budget_s: float, dry: bool,
                 only: set[str] | None = None) -> None:
        self.t0 = time.time()
        self.only = only
        self.out = out
        self.budget_s = budget_s
        self.dry = dry
        self.results: dict = {"sections": {}, "log": []}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.results["log"].append(line)

    def save(self) -> None:
        self.results["elapsed_s"] = self.elapsed()
        (self.out / "session_results.json").write_text(json.dumps(self.results, indent=1,
                                                                  default=str))

    def section(self, name: str, fn, need_s: float = 0.0, *args):
        """Run ``fn(self, *args)``; its return value (or the error) goes under results[name]."""
        if self.only is not None and name not in self.only and name != "meta":
            self.results["sections"][name] = {"skipped": "not in --sections"}
            return None
        if self.left() < need_s:
            self.log(f"{name}: skipped ({self.left():.0f} s left, needs ~{need_s:.0f} s)")
            self.results["sections"][name] = {"skipped": f"budget ({self.left():.0f} s left)"}
            self.save()
            return None
        self.log(f"{name}: start")
        t = time.time()
        try:
            res = fn(self, *args)
        except Exception as err:  # noqa: BLE001 - report and go on
            res = {"error": f"{type(err).__name__}: {err}", "traceback":
                   traceback.format_exc(limit=6)}
            self.log(f"{name}: FAILED {type(err).__name__}: {str(err)[:300]}")
        else:
            self.log(f"{name}: done in {time.time() - t:.1f} s")
        self.results["sections"][name] = res
        self.save()
        return res


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, rep_ms: float = 100.0, warmup_ms: float = 25.0) -> float:
    """Median ms: CUDA events through triton's do_bench on a GPU; wall clock on the CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                             return_mode="median"))
    t = time.perf_counter()  # a dry run on the CPU: one call, only to exercise the code
    fn()
    return (time.perf_counter() - t) * 1e3


def peak_extra_mb(fn) -> float | None:
    """MB allocated at the peak of one call beyond what was allocated before it."""
    if not torch.cuda.is_available():
        fn()
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 28) if torch.cuda.is_available() else (1 << 20)
    src = torch.empty(n, device=device()).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms=200)
    return 2 * n * 4 / (ms * 1e-3)


# ------------------------------------------------------------------------------------------------
# Scan: variants, inputs, verification
# ------------------------------------------------------------------------------------------------


def scan_inputs(L, dtype, batch=8, dim=1024, n=16, grad=True, seed=None):
    """Mamba-like inputs drawn in their own dtype (no float32 temporary)."""
    dev = device()
    g = torch.Generator(device=dev).manual_seed(L if seed is None else seed)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return torch.randn(*shape, generator=g, device=dev, dtype=dt).mul_(scale).add_(shift)

    inp = dict(u=rnd(batch, dim, L), delta=rnd(batch, dim, L, scale=0.5), z=rnd(batch, dim, L),
               B=rnd(batch, n, L), C=rnd(batch, n, L),
               A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(dim, 1),
               D=rnd(dim, dt=torch.float32),
               delta_bias=rnd(dim, scale=1.0, shift=-4.0, dt=torch.float32))
    for t in inp.values():
        t.requires_grad_(grad)
    return inp


def floor_bytes(L, dtype, batch=8, dim=1024, n=16):
    """(forward, forward+backward) minimum bytes: every input read once, every output written
    once (forward: u, delta, z, B, C -> out; backward: u, delta, z, B, C, dout -> du, ddelta,
    dz, dB, dC)."""
    es = torch.tensor([], dtype=dtype).element_size()
    big, small = batch * dim * L * es, batch * n * L * es
    fwd = 4 * big + 2 * small
    return fwd, fwd + 7 * big + 4 * small


@contextlib.contextmanager
def scan_variant(v: dict):
    """Inside: the Triton scan runs launch shape ``v`` (fwd, optional fwd_train, bwd, atomic,
    sem); the module's configuration is restored afterwards."""
    from tsssm.ssm import scan_triton as st

    saved = (dict(st.FWD_CONFIG), dict(st.BWD_CONFIG), dict(st.FWD_TRAIN_CONFIG),
             dict(st.FWD_CONFIG_BY_DTYPE), dict(st.BWD_CONFIG_BY_DTYPE),
             dict(st.FWD_TRAIN_CONFIG_BY_DTYPE), st.BWD_ATOMIC_BC, st.ATOMIC_SEM)
    try:
        st.FWD_CONFIG.update(v["fwd"])
        st.BWD_CONFIG.update(v["bwd"])
        st.FWD_TRAIN_CONFIG.clear()
        st.FWD_TRAIN_CONFIG.update(v.get("fwd_train", {}))
        for d in (st.FWD_CONFIG_BY_DTYPE, st.BWD_CONFIG_BY_DTYPE, st.FWD_TRAIN_CONFIG_BY_DTYPE):
            d.clear()
        st.BWD_ATOMIC_BC = v["atomic"]
        st.ATOMIC_SEM = v["sem"]
        yield
    finally:
        (fwd, bwd, train, fbd, bbd, tbd, st.BWD_ATOMIC_BC, st.ATOMIC_SEM) = saved
        for cur, old in ((st.FWD_CONFIG, fwd), (st.BWD_CONFIG, bwd), (st.FWD_TRAIN_CONFIG, train),
                         (st.FWD_CONFIG_BY_DTYPE, fbd), (st.BWD_CONFIG_BY_DTYPE, bbd),
                         (st.FWD_TRAIN_CONFIG_BY_DTYPE, tbd)):
            cur.clear()
            cur.update(old)


def new_variant() -> dict:
    """This branch's defaults, as a variant."""
    from tsssm.ssm import scan_triton as st

    return dict(fwd=dict(st.FWD_CONFIG), fwd_train=dict(st.FWD_TRAIN_CONFIG),
                bwd=dict(st.BWD_CONFIG), atomic=st.BWD_ATOMIC_BC, sem=st.ATOMIC_SEM)


def tsssm_call(inp):
    """The fused Triton scan (called past the dispatcher, which would refuse the CPU tensors of
    a dry run under the interpreter; on a GPU it is what backend="triton" runs)."""
    from tsssm.ssm.scan import selective_scan_triton

    return lambda: selective_scan_triton(**inp, delta_softplus=True)[0]


def mamba_call(inp):
    import peers

    return lambda: peers.mamba_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                                    inp["D"], inp["z"], inp["delta_bias"], True)


def fwd_bwd_fn(call, inp, dout):
    params = [t for t in inp.values() if t.requires_grad]

    def f():
        for t in params:
            t.grad = None
        call().backward(dout)
    return f


def outputs_and_grads(call, inp, dout) -> dict:
    for t in inp.values():
        t.grad = None
    out = call()
    out.backward(dout)
    res = {"out": out.detach()}
    res.update({f"d{k}": t.grad.detach() for k, t in inp.items()})
    for t in inp.values():
        t.grad = None
    return res


def rel_errors(got: dict, ref: dict) -> dict:
    """||got - ref|| / ||ref|| per tensor (inf when not finite)."""
    out = {}
    for k in ref:
        a, b = got[k].double(), ref[k].double()
        err = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
        out[k] = err if math.isfinite(err) else float("inf")
    return out


VERIFY_TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def verify_variant(v: dict, dtype, with_grad: bool, L: int, dim: int) -> dict:
    """The variant against the float64 torch path on fresh inputs: forward (and every gradient).
    Shapes divisible by 16 like the timed ones, so that this compiles the very kernels that the
    timing sections then take from Triton's cache."""
    from tsssm.ssm.scan import selective_scan_torch

    inp = scan_inputs(L, dtype, batch=2, dim=dim, grad=with_grad, seed=L + 7)
    inp64 = {k: t.detach().double().requires_grad_(with_grad) for k, t in inp.items()}
    with scan_variant(v):
        if with_grad:
            dout = torch.randn(2, dim, L, device=device(), dtype=dtype)
            got = outputs_and_grads(tsssm_call(inp), inp, dout)
        else:
            with torch.no_grad():
                got = {"out": tsssm_call(inp)()}
    ref_call = lambda: selective_scan_torch(**inp64, delta_softplus=True, chunk=128)[0]  # noqa: E731
    if with_grad:
        ref = outputs_and_grads(ref_call, inp64, dout.double())
    else:
        with torch.no_grad():
            ref = {"out": ref_call()}
    errs = rel_errors(got, ref)
    worst = max(errs.values())
    return {"ok": worst <= VERIFY_TOL[dtype], "worst_rel_err": worst, "errors": errs}


def worker_tasks(dry: bool) -> list[dict]:
    """Every (variant, dtype, grad) the timing sections run, as verification tasks."""
    tasks = []
    # first what the scan table times (this branch's defaults and the old kernel): if the
    # workers are stopped before the end, those at least are compiled and verified
    for dt in ("bfloat16", "float32"):
        tasks.append(dict(kind="fwd", dtype=dt, v=new_variant()))
        tasks.append(dict(kind="train", dtype=dt, v=new_variant()))
        tasks.append(dict(kind="fwd", dtype=dt, v=OLD))
        if not dry:
            tasks.append(dict(kind="train", dtype=dt, v=OLD))
    for dt in ("bfloat16", "float32"):
        for cfg in FWD_SWEEP[1: (1 if dry else None)]:  # FWD_SWEEP[0] is OLD's forward
            tasks.append(dict(kind="fwd", dtype=dt, v=dict(OLD, fwd=cfg)))
        if not dry:
            tasks.append(dict(kind="train", dtype=dt, v=dict(OLD, atomic=True, sem="acq_rel")))
        tasks.append(dict(kind="train", dtype=dt, v=dict(OLD, atomic=True, sem="relaxed")))
        for fcfg in TRAIN_FWD[: (1 if dry else None)]:
            for bcfg in BWD_SWEEP[: (1 if dry else None)]:
                tasks.append(dict(kind="train", dtype=dt, v=dict(
                    fwd=fcfg, bwd=bcfg, atomic=True, sem="relaxed")))
    return tasks


def task_key(t: dict) -> str:
    return json.dumps([t["kind"], t["dtype"], t["v"]], sort_keys=True)


def run_worker(index: int, count: int, out: Path, dry: bool) -> None:
    """Worker process: verify (and so compile) its share of the tasks; results as JSON lines."""
    L, dim = (32, 16) if dry else (4096, 256)
    path = out / f"worker_{index}.jsonl"
    with path.open("w") as f:
        for i, task in enumerate(worker_tasks(dry)):
            if i % count != index:
                continue
            t0 = time.time()
            try:
                res = verify_variant(task["v"], getattr(torch, task["dtype"]),
                                     task["kind"] == "train", L, dim)
            except Exception as err:  # noqa: BLE001 - a shape that does not compile is reported
                res = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            res["seconds"] = time.time() - t0
            f.write(json.dumps({"key": task_key(task), **res}) + "\n")
            f.flush()


def collect_workers(out: Path) -> dict[str, dict]:
    done = {}
    for path in sorted(out.glob("worker_*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done[rec.pop("key")] = rec
    return done


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def sec_meta(s: Session) -> dict:
    import triton

    meta = dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
                cpus=os.cpu_count())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta.update(device=props.name, sms=props.multi_processor_count,
                    memory_GiB=props.total_memory / 2**30)
    else:
        meta["device"] = "cpu (dry run)"
    try:
        import jax

        meta["jax"] = jax.__version__
    except Exception:  # noqa: BLE001
        meta["jax"] = None
    bw = copy_bandwidth()
    meta["copy_bandwidth_GBs"] = bw / 1e9
    s.bw = bw
    s.log(f"device {meta['device']}, copy bandwidth {bw / 1e9:.0f} GB/s")
    return meta


#: pytest -m gpu, split into processes that compile at the same time (the scan tests compile a
#: forward and a backward kernel per shape and dtype: minutes in one process).
PYTEST_SPLITS = [
    ["tests/ssm/test_scan_triton.py::test_gpu_kernels_match_reference", "-k", "dtype0"],
    ["tests/ssm/test_scan_triton.py::test_gpu_kernels_match_reference", "-k", "dtype1"],
    ["tests/ssm/test_scan_triton.py::test_gpu_kernels_match_reference", "-k", "dtype2"],
    ["tests/ssm/test_scan_triton.py::test_gpu_long_sequence_against_float64_torch_path",
     "tests/ssm/test_scan_triton.py::test_gpu_auto_backend_uses_triton"],
    ["tests/kalman/test_fused_triton.py"],
    ["tests/kalman/test_fused_grad.py"],
]


def start_background(s: Session, args) -> None:
    """pytest -m gpu and the compile/verify workers, all at once."""
    s.procs = {}
    env = dict(os.environ)
    if s.dry:
        env["TRITON_INTERPRET"] = "1"
    if not s.dry and not args.no_tests:
        for i, split in enumerate(PYTEST_SPLITS):
            log = (s.out / f"pytest_gpu_{i}.log").open("w")
            s.procs[f"pytest{i}"] = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                 *split], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    for i in range(args.workers):
        log = (s.out / f"worker_{i}.log").open("w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(i), "--workers",
               str(args.workers), "--out", str(s.out)] + (["--dry-run"] if s.dry else [])
        s.procs[f"worker{i}"] = subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                                 stderr=subprocess.STDOUT, env=env)


def sec_wait_background(s: Session, max_wait_s: float) -> dict:
    res = {}
    deadline = time.time() + max_wait_s
    for name, proc in s.procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
            res[name] = {"rc": proc.returncode}
        except subprocess.TimeoutExpired:
            proc.kill()
            res[name] = {"rc": None, "killed": f"still running after {max_wait_s:.0f} s"}
    summaries = []
    for i in range(len(PYTEST_SPLITS)):
        name = f"pytest{i}"
        if name in s.procs:
            tail = (s.out / f"pytest_gpu_{i}.log").read_text().strip().splitlines()[-1:]
            res[name]["summary"] = tail[-1] if tail else ""
            summaries.append(res[name]["summary"])
    if summaries:
        res["pytest"] = {"summary": " | ".join(summaries),
                         "ok": all(res[f"pytest{i}"]["rc"] == 0 for i in range(len(PYTEST_SPLITS))
                                   if f"pytest{i}" in res)}
        s.log(f"pytest -m gpu: {res['pytest']}")
    s.verified = collect_workers(s.out)
    bad = {k: v for k, v in s.verified.items() if not v.get("ok")}
    res["verified"] = len(s.verified)
    res["failed"] = bad
    s.log(f"workers verified {len(s.verified)} variants, {len(bad)} failed")
    return res


def is_verified(s: Session, kind: str, dtype, v: dict, strict: bool = False) -> bool:
    """Whether a worker verified the variant. A variant without a record (workers stopped
    early) runs unless ``strict``: the sweep times only what the workers compiled, since a
    compile in this process costs the sections after it their time."""
    rec = s.verified.get(task_key(dict(kind=kind, dtype=str(dtype).replace("torch.", ""), v=v)))
    return (not strict) if rec is None else bool(rec.get("ok"))


#: Wall-clock cap of one dtype's sweep (seconds).
SWEEP_CAP_S = 40.0


def sec_scan_sweep(s: Session, dtype) -> dict:
    """Forward shapes, then (training forward, backward) pairs and dB/dC modes, at one L."""
    L = 32 if s.dry else 16384
    small = dict(batch=1, dim=16) if s.dry else {}
    t_end = time.time() + SWEEP_CAP_S
    inp = scan_inputs(L, dtype, grad=False, **small)
    fwd = {}
    for cfg in FWD_SWEEP[: (1 if s.dry else None)]:
        v = dict(OLD, fwd=cfg)
        if time.time() > t_end:
            fwd[json.dumps(cfg)] = "skipped (sweep cap)"
            continue
        if not is_verified(s, "fwd", dtype, v, strict=True):
            fwd[json.dumps(cfg)] = "not verified (or not compiled) by the workers"
            continue
        with scan_variant(v), torch.no_grad():
            try:
                fwd[json.dumps(cfg)] = bench_ms(tsssm_call(inp))
            except Exception as err:  # noqa: BLE001
                fwd[json.dumps(cfg)] = f"{type(err).__name__}: {str(err)[:120]}"
        s.log(f"  fwd {dtype} {cfg}: {fwd[json.dumps(cfg)]}")
    del inp
    inp = scan_inputs(L, dtype, grad=True, **small)
    dout = torch.randn_like(inp["u"])
    train = {}
    pairs = [OLD, dict(OLD, atomic=True, sem="acq_rel"), dict(OLD, atomic=True, sem="relaxed")]
    if s.dry:
        pairs = pairs[2:]
    for fcfg in TRAIN_FWD[: (1 if s.dry else None)]:
        for bcfg in BWD_SWEEP[: (1 if s.dry else None)]:
            pairs.append(dict(fwd=fcfg, bwd=bcfg, atomic=True, sem="relaxed"))
    for v in pairs:
        key = json.dumps(v, sort_keys=True)
        if s.left() < 60 or time.time() > t_end:
            train[key] = "skipped (budget)"
            continue
        if not is_verified(s, "train", dtype, v, strict=True):
            train[key] = "not verified (or not compiled) by the workers"
            continue
        with scan_variant(v):
            try:
                train[key] = bench_ms(fwd_bwd_fn(tsssm_call(inp), inp, dout), rep_ms=150)
            except Exception as err:  # noqa: BLE001
                train[key] = f"{type(err).__name__}: {str(err)[:120]}"
        s.log(f"  fwd+bwd {dtype} {v}: {train[key]}")
    timed_f = {k: t for k, t in fwd.items() if isinstance(t, float)}
    timed_t = {k: t for k, t in train.items() if isinstance(t, float)}
    best = None
    if timed_f and timed_t:
        bf = json.loads(min(timed_f, key=timed_f.get))
        bt = json.loads(min(timed_t, key=timed_t.get))
        best = dict(fwd=bf, fwd_train=bt["fwd"], bwd=bt["bwd"], atomic=bt["atomic"],
                    sem=bt["sem"])
        s.best = getattr(s, "best", {})
        s.best[str(dtype)] = best
    return {"L": L, "fwd_ms": fwd, "fwd_bwd_ms": train, "best": best}


def scan_rows(s: Session, L: int, dtype, variants: dict, agree_with: dict | None) -> list[dict]:
    """Time each variant (name -> variant dict, or "mamba-ssm") at (L, dtype)."""
    small = dict(batch=1, dim=16) if s.dry else {}
    batch, dim = (1, 16) if s.dry else (8, 1024)
    fl_f, fl_fb = floor_bytes(L, dtype, batch=batch, dim=dim)
    rows = []
    inp = scan_inputs(L, dtype, grad=True, **small)
    dout = torch.randn(batch, dim, L, device=device(), dtype=dtype,
                       generator=torch.Generator(device=device()).manual_seed(1))
    for name, v in variants.items():
        row = dict(impl=name, dtype=str(dtype).replace("torch.", ""), L=L)
        try:
            if v == "mamba-ssm":
                ctx, call = contextlib.nullcontext(), mamba_call(inp)
            else:
                ctx, call = scan_variant(v), tsssm_call(inp)
            with ctx:
                with torch.no_grad():
                    row["fwd_ms"] = bench_ms(call)
                    row["fwd_peak_MB"] = peak_extra_mb(call)
                f = fwd_bwd_fn(call, inp, dout)
                row["fwd_bwd_ms"] = bench_ms(f, rep_ms=150)
                row["fwd_bwd_peak_MB"] = peak_extra_mb(f)
                if agree_with is not None and L <= 16384:
                    got = outputs_and_grads(call, inp, dout)
                    ref = agree_with.get((L, str(dtype)))
                    if ref is None:
                        agree_with[(L, str(dtype))] = got
                    else:
                        row["rel_err_vs_tsssm"] = rel_errors(got, ref)
                    del got
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        if "fwd_ms" in row:
            row["fwd_floor_ms"] = fl_f / s.bw * 1e3
            row["fwd_x_floor"] = row["fwd_ms"] / row["fwd_floor_ms"]
        if "fwd_bwd_ms" in row:
            row["fwd_bwd_floor_ms"] = fl_fb / s.bw * 1e3
            row["fwd_bwd_x_floor"] = row["fwd_bwd_ms"] / row["fwd_bwd_floor_ms"]
        s.log(f"  {row}")
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def sec_scan_table(s: Session) -> dict:
    Ls = [32] if s.dry else [1024, 16384, 65536]
    dtypes = [torch.bfloat16, torch.float32]
    s.scan_ref = {}  # (L, dtype) -> outputs and grads of "new", for the agreement columns
    rows = []
    for dtype in dtypes:
        for L in Ls:
            variants = {"tsssm new": new_variant(), "tsssm old": OLD}
            best = getattr(s, "best", {}).get(str(dtype))
            if best is not None and best != new_variant():
                variants["tsssm swept"] = best
            if s.left() < 45:
                s.log(f"  scan table: stop at {dtype} L={L} (budget)")
                return {"rows": rows, "stopped": f"budget at {dtype} L={L}"}
            rows += scan_rows(s, L, dtype, variants, s.scan_ref)
            s.results["sections"]["scan_table"] = {"rows": rows}
            s.save()
    return {"rows": rows}


def mamba_ready(s: Session, build: Path | None, wait_s: float) -> str:
    """Wait (up to wait_s) for the background build; import the extension. Returns a status."""
    import importlib

    import peers

    if peers.mamba_ssm() is not None:
        return "importable"
    if build is None:
        return "no build directory"
    rc_file = s.out / "mamba_build.rc"
    deadline = time.time() + wait_s
    while not rc_file.exists() and time.time() < deadline:
        time.sleep(2)
    if not rc_file.exists():
        return f"build not finished after waiting {wait_s:.0f} s"
    rc = rc_file.read_text().strip()
    if rc == "missing":
        return "no mamba-ssm source carried (.anchors/mamba_ssm_scan)"
    if rc != "0":
        return f"build failed (rc {rc}, see mamba_build.log)"
    sys.path.insert(0, str(build))
    importlib.invalidate_caches()
    return "importable" if peers.mamba_ssm() is not None else "built but not importable"


def sec_mamba_scan(s: Session, build) -> dict:
    # the build started with the session; wait for it while training (after this section,
    # ~30 s) keeps its time
    status = mamba_ready(s, build, wait_s=max(0.0, min(150.0, s.left() - 70)))
    s.mamba_status = status
    s.log(f"mamba-ssm: {status}")
    if status != "importable":
        return {"status": status}
    Ls = [1024, 16384, 65536]
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for L in Ls:
            if s.left() < 40:
                return {"status": status, "rows": rows, "stopped": "budget"}
            rows += scan_rows(s, L, dtype, {"mamba-ssm": "mamba-ssm"}, s.scan_ref)
            s.results["sections"]["mamba_scan"] = {"status": status, "rows": rows}
            s.save()
    return {"status": status, "rows": rows}


def simulate_llt(M: dict, S: int, T: int, seed: int):
    """y (S, T) float64 numpy drawn from the local linear trend model ``M``, by cumulative sums
    on the device (kalman.simulate's Python loop over steps takes tens of seconds at 10^4 x 10^4
    or 10^6 steps): trend_t = trend_{t-1} + w2_t, level_t = level_{t-1} + trend_{t-1} + w1_t,
    y_t = level_t + v_t, the state at t = 0 drawn from (m0, P0)."""
    import numpy as np

    if not (np.array_equal(M["F"], [[1.0, 1.0], [0.0, 1.0]])
            and np.array_equal(M["H"], [[1.0, 0.0]])):
        raise ValueError("simulate_llt: not a local linear trend model")
    dev = device()
    g = torch.Generator(device=dev).manual_seed(seed)
    t64 = {k: torch.as_tensor(v, dtype=torch.float64, device=dev) for k, v in M.items()}
    Lq = torch.linalg.cholesky(t64["Q"] + 1e-12 * torch.eye(2, dtype=torch.float64, device=dev))
    x0 = t64["m0"] + torch.randn(S, 2, generator=g, device=dev, dtype=torch.float64) @ \
        torch.linalg.cholesky(t64["P0"]).T  # (S, 2)
    w = torch.randn(S, T, 2, generator=g, device=dev, dtype=torch.float64) @ Lq.T  # (S, T, 2)
    w[:, 0] = 0.0  # no transition into the first step
    trend = x0[:, 1:] + w[..., 1].cumsum(1)  # (S, T)
    prev_trend = torch.cat([torch.zeros_like(trend[:, :1]), trend[:, :-1]], dim=1)
    level = x0[:, :1] + (w[..., 0] + prev_trend).cumsum(1)
    r = math.sqrt(float(M["R"][0, 0]))
    y = level + r * torch.randn(S, T, generator=g, device=dev, dtype=torch.float64)
    return y.cpu().numpy()


def sec_kalman(s: Session) -> dict:
    """Fused filter 10k x 10k float32 vs floor and dynamax; the differentiable path."""
    import numpy as np
    import peers
    from kalman import fused_bytes, model_matrices, tsssm_model

    from tsssm.kalman import kalman_filter
    from tsssm.kalman.fused_triton import DEFAULT_OUTPUTS, KERNEL_OUTPUTS, fused_kalman_filter

    dev = device()
    S, T = (40, 32) if s.dry else (10_000, 10_000)
    M = model_matrices("llt")
    y_np = simulate_llt(M, S, T, seed=7)
    y64 = torch.from_numpy(y_np).to(dev)[..., None]
    y = y64.float()
    y_tm = y.transpose(0, 1).contiguous().transpose(0, 1)  # same values, time-major storage
    ssm = tsssm_model(M, torch.float32, dev)
    res = {"shape": [S, T], "rows": []}
    tm = dict(y_layout="time")  # the 100-series check below then reads time-major too
    variants = [("default", y, {}), ("y time-major", y_tm, tm),
                ("y time-major, prefetch 4", y_tm, dict(tm, prefetch=4)),
                ("y time-major, 4 steps/iter, prefetch 2", y_tm, dict(tm, chunk_mult=4,
                                                                      prefetch=2)),
                ("log_liks only", y, dict(outputs=("log_liks",))),
                ("all 7 outputs", y, dict(outputs=tuple(KERNEL_OUTPUTS)))]
    ref100 = kalman_filter(tsssm_model(M, torch.float64, dev), y64[:100]).loglik
    for label, yy, kw in variants:
        row = {"variant": label}
        try:
            outs = kw.get("outputs", DEFAULT_OUTPUTS)
            fused_kalman_filter(ssm, yy, **kw)  # compile
            row["ms"] = bench_ms(lambda yy=yy, kw=kw: fused_kalman_filter(ssm, yy, **kw))
            row["floor_ms"] = fused_bytes(S, T, 2, 1, 4, outs) / s.bw * 1e3
            row["x_floor"] = row["ms"] / row["floor_ms"]
            r = fused_kalman_filter(ssm, yy[:100], **kw)
            row["loglik_rel_err_vs_fp64"] = float(
                ((r.loglik.double() - ref100).abs() / ref100.abs()).max())
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        s.log(f"  kalman {row}")
        res["rows"].append(row)
    # the differentiable path: loglik.sum() backward into Q and R (a model's MLE step)
    for label, SS, TT in (("fused fwd+bwd", S, T), ("fused fwd+bwd", S, T // 10),
                          ("torch sequential fwd+bwd", S, T // 10)):
        row = {"variant": label, "shape": [SS, TT]}
        if s.left() < 60:
            row["skipped"] = "budget"
            res["rows"].append(row)
            continue
        try:
            Q = ssm.Q.clone().requires_grad_()
            R = ssm.R.clone().requires_grad_()
            yy = y[:SS, :TT]
            method = "fused" if label.startswith("fused") else "sequential"

            def step(Q=Q, R=R, yy=yy, method=method):
                Q.grad = R.grad = None
                m = ssm._replace(Q=Q, R=R)
                r = (fused_kalman_filter(m, yy) if method == "fused"
                     else kalman_filter(m, yy))
                r.loglik.sum().backward()

            step()
            if method == "sequential":
                t0 = time.perf_counter()
                step()
                sync()
                row["ms"] = (time.perf_counter() - t0) * 1e3
            else:
                row["ms"] = bench_ms(step, rep_ms=200)
                # floor: forward (y in; default outputs + predicted mean/cov out) + adjoint
                # (y, predicted mean/cov in; 20 gradient columns out per series)
                outs = (*DEFAULT_OUTPUTS, "predicted_mean", "predicted_cov")
                nbytes = fused_bytes(SS, TT, 2, 1, 4, outs) + SS * TT * (1 + 2 + 4) * 4
                row["floor_ms"] = nbytes / s.bw * 1e3
                row["x_floor"] = row["ms"] / row["floor_ms"]
            row["dQ_abs_max"] = float(Q.grad.abs().max())
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        s.log(f"  kalman {row}")
        res["rows"].append(row)
    # dynamax jit(vmap(lgssm_filter)) on the same data, float32
    if peers.dynamax_available() and s.left() > 60:
        try:
            import jax.numpy as jnp

            f = peers.dynamax_filter(M, "float32")
            yj = jnp.asarray(y_np[..., None].astype(np.float32))
            secs, ll = peers.jax_time(f, yj, reps=1 if s.dry else 2)
            tl = fused_kalman_filter(ssm, y).loglik.double().cpu().numpy()
            res["dynamax"] = {"seconds": secs, "backend": str(yj.devices()),
                              "loglik_rel_diff_vs_fused": float(
                                  np.max(np.abs(np.asarray(ll, dtype=np.float64) - tl)
                                         / np.abs(tl)))}
        except Exception as err:  # noqa: BLE001
            res["dynamax"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    else:
        res["dynamax"] = {"skipped": "dynamax not importable" if not peers.dynamax_available()
                          else "budget"}
    s.log(f"  dynamax {res['dynamax']}")
    return res


def sec_parallel(s: Session) -> dict:
    """One long series, float64: tsssm sequential / parallel vs dynamax's parallel filter."""
    import peers
    from kalman import model_matrices, tsssm_model

    from tsssm.kalman import kalman_filter

    dev = device()
    M = model_matrices("llt")
    rows = []
    for T in ([128] if s.dry else [10**5, 10**6]):
        if s.left() < 40:
            break
        y_np = simulate_llt(M, 1, T, seed=T)[0]
        y = torch.from_numpy(y_np).to(dev)[None, :, None]
        ssm = tsssm_model(M, torch.float64, dev)
        row = {"T": T}
        for method in ("sequential", "parallel"):
            try:
                kalman_filter(ssm, y, method=method)
                sync()
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    r = kalman_filter(ssm, y, method=method)
                    sync()
                    times.append(time.perf_counter() - t0)
                row[f"{method}_ms"] = sorted(times)[1] * 1e3
                row[f"{method}_loglik"] = float(r.loglik.sum())
            except Exception as err:  # noqa: BLE001
                row[f"{method}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        if peers.dynamax_available():
            try:
                import jax.numpy as jnp

                g = peers.dynamax_parallel_filter(M, "float64")
                secs, ll = peers.jax_time(g, jnp.asarray(y_np[:, None]))
                row["dynamax_parallel_ms"] = secs * 1e3
                row["dynamax_parallel_loglik"] = float(ll)
            except Exception as err:  # noqa: BLE001
                row["dynamax_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        base = row.get("sequential_loglik")
        for k in ("parallel", "dynamax_parallel"):
            if base is not None and f"{k}_loglik" in row:
                row[f"{k}_rel_err"] = abs(row[f"{k}_loglik"] - base) / abs(base)
        s.log(f"  parallel {row}")
        rows.append(row)
    return {"rows": rows}


def sec_training(s: Session) -> dict:
    """Mamba forecaster training steps: tsssm's kernel vs mamba-ssm's."""
    import mamba_train

    backends = ["triton"]
    if getattr(s, "mamba_status", None) == "importable":
        backends.append("mamba-ssm")
    if s.dry:
        backends = ["torch"]
    shapes = [(192, 64, 20), (4096, 16, 10)] if not s.dry else [(32, 4, 2)]
    rows = []
    for window, batch, steps in shapes:
        for b in backends:
            if s.left() < 20:
                return {"rows": rows, "stopped": "budget"}
            args = argparse.Namespace(device=device(), batch=batch, window=window, horizon=96 if
                                      window > 96 else 8, channels=7, d_model=64, layers=2,
                                      d_state=16, steps=steps, warmup=3, threads=None)
            try:
                rows.append(mamba_train.measure(b, args))
            except Exception as err:  # noqa: BLE001
                rows.append({"backend": b, "window": window, "batch": batch,
                             "error": f"{type(err).__name__}: {str(err)[:300]}"})
            s.log(f"  train {rows[-1]}")
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# The compact table
# ------------------------------------------------------------------------------------------------


def _f(x, fmt="{:.3g}") -> str:
    return "" if x is None else (fmt.format(x) if isinstance(x, (int, float)) else str(x))


def compact_table(results: dict) -> str:
    sec = results["sections"]
    meta = sec.get("meta") or {}
    lines = [f"# GPU session {meta.get('date', '')}: {meta.get('device', '?')}, torch "
             f"{meta.get('torch')}, triton {meta.get('triton')}, copy bandwidth "
             f"{_f(meta.get('copy_bandwidth_GBs'), '{:.0f}')} GB/s", ""]
    bg = sec.get("background") or {}
    if bg:
        lines.append(f"pytest -m gpu: {bg.get('pytest', {}).get('summary', 'not run')}; "
                     f"variants verified {bg.get('verified')}, failed {len(bg.get('failed', {}))}")
        lines.append("")
    rows = list((sec.get("scan_table") or {}).get("rows", []))
    rows += list((sec.get("mamba_scan") or {}).get("rows", []))
    if rows:
        lines += ["## Selective scan (batch 8, dim 1024, N 16, z, D, delta_bias, softplus)", "",
                  "| impl | dtype | L | fwd ms | fwd x floor | fwd+bwd ms | fwd+bwd x floor | "
                  "fwd+bwd peak MB | worst rel err vs tsssm new |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["dtype"], r["L"], r["impl"])):
            err = r.get("rel_err_vs_tsssm")
            worst = max(err.values()) if err else None
            lines.append(
                f"| {r['impl']} | {r['dtype']} | {r['L']} | {_f(r.get('fwd_ms'))} | "
                f"{_f(r.get('fwd_x_floor'), '{:.1f}')} | {_f(r.get('fwd_bwd_ms'))} | "
                f"{_f(r.get('fwd_bwd_x_floor'), '{:.1f}')} | "
                f"{_f(r.get('fwd_bwd_peak_MB'), '{:.0f}')} | {_f(worst, '{:.1e}')} |"
                + (f" error: {r['error'][:80]}" if "error" in r else ""))
        lines.append("")
    for dt in ("torch.bfloat16", "torch.float32"):
        sw = sec.get(f"scan_sweep_{dt.split('.')[1]}") or {}
        if sw.get("best"):
            lines.append(f"sweep best {dt}: {json.dumps(sw['best'])}")
    ms = sec.get("mamba_scan") or {}
    if ms.get("status") and ms.get("status") != "importable":
        lines.append(f"mamba-ssm: {ms['status']}")
    k = sec.get("kalman") or {}
    if k.get("rows"):
        lines += ["", f"## Fused Kalman filter, LLT float32, {k.get('shape')}", "",
                  "| variant | ms | x floor | loglik rel err vs fp64 |", "|---|---:|---:|---:|"]
        for r in k["rows"]:
            lines.append(f"| {r['variant']} {r.get('shape', '')} | {_f(r.get('ms'))} | "
                         f"{_f(r.get('x_floor'), '{:.2f}')} | "
                         f"{_f(r.get('loglik_rel_err_vs_fp64'), '{:.1e}')} |"
                         + (f" error: {r['error'][:80]}" if "error" in r else ""))
        lines.append(f"\ndynamax jit(vmap(lgssm_filter)): {json.dumps(k.get('dynamax'))}")
    par = sec.get("parallel") or {}
    if par.get("rows"):
        lines += ["", "## One long series, float64 (ms; loglik rel err vs sequential)", "",
                  "| T | sequential | parallel | dynamax parallel | parallel err | dynamax err |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in par["rows"]:
            lines.append(f"| {r['T']} | {_f(r.get('sequential_ms'))} | {_f(r.get('parallel_ms'))}"
                         f" | {_f(r.get('dynamax_parallel_ms'))} | "
                         f"{_f(r.get('parallel_rel_err'), '{:.1e}')} | "
                         f"{_f(r.get('dynamax_parallel_rel_err'), '{:.1e}')} |")
    tr = sec.get("training") or {}
    if tr.get("rows"):
        lines += ["", "## Mamba forecaster training", "",
                  "| backend | window | batch | ms/step | samples/s | peak MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in tr["rows"]:
            lines.append(f"| {r.get('backend')} | {r.get('window')} | {r.get('batch')} | "
                         f"{_f(r.get('ms_per_step'))} | {_f(r.get('samples_per_s'), '{:.0f}')} |"
                         f" {_f(r.get('peak_mib'), '{:.0f}')} |"
                         + (f" error: {r['error'][:80]}" if "error" in r else ""))
    failed = [n for n, v in sec.items() if isinstance(v, dict) and "error" in v]
    if failed:
        lines += ["", "FAILED sections: " + ", ".join(failed)]
    lines.append(f"\nelapsed {results.get('elapsed_s', 0):.0f} s")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_session_out"))
    p.add_argument("--budget-s", type=float, default=460.0,
                   help="wall-clock budget of this script; sections that would overrun skip")
    p.add_argument("--mamba-build", default=None, help="folder of the mamba-ssm build")
    p.add_argument("--workers", type=int, default=5, help="compile/verify worker processes")
    p.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    p.add_argument("--dry-run", action="store_true",
                   help="every code path on the CPU at toy sizes (Triton interpreter)")
    p.add_argument("--sections", default=None,
                   help="comma-separated sections to run (meta always runs), e.g. kalman,parallel")
    p.add_argument("--table-only", action="store_true",
                   help="print (and write) the compact table of an earlier --out's results")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.table_only:
        table = compact_table(json.loads((out / "session_results.json").read_text()))
        (out / "session_table.md").write_text(table)
        print(table, flush=True)
        return
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.worker is not None:
        run_worker(args.worker, args.workers, out, args.dry_run)
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_session: no CUDA device (use --dry-run to check the script on a CPU)")
    s = Session(out, args.budget_s, args.dry_run,
                set(args.sections.split(",")) if args.sections else None)
    s.bw = None
    s.verified = {}
    build = Path(args.mamba_build) if args.mamba_build else None
    s.section("meta", sec_meta)
    s.procs = {}
    # a stop from gpu_session.sh's timeout unwinds (so that the workers are stopped below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if s.only is None or "background" in s.only:
        start_background(s, args)
    try:
        run_sections(s, build)
    finally:
        for proc in s.procs.values():  # those the background section did not wait for
            if proc.poll() is None:
                proc.kill()
    table = compact_table(s.results)
    (out / "session_table.md").write_text(table)
    print("\n" + table, flush=True)


def run_sections(s: Session, build: Path | None) -> None:
    # Planned at --budget-s 460 on an H200: meta ~15 s, background <= 145 s, sweeps <= 2 x 40 s,
    # scan table ~60 s, Kalman ~50 s, parallel ~30 s, mamba-ssm ~20 s (right after the table
    # when its build, started with the session, has finished by then; else after the Kalman
    # sections) and training ~40 s. The needs below let the later sections start; a section
    # that does not fit is skipped, not cut short.
    s.section("background", sec_wait_background, 0.0, max(30.0, min(150.0, s.left() - 300)))
    for dtype in (torch.bfloat16, torch.float32):
        s.section(f"scan_sweep_{str(dtype).split('.')[1]}", sec_scan_sweep, 240.0, dtype)
    s.section("scan_table", sec_scan_table, 120.0)
    build_done = (s.out / "mamba_build.rc").exists()
    if build_done:  # the peer's column while the budget is sure to hold it
        s.section("mamba_scan", sec_mamba_scan, 40.0, build)
    s.section("kalman", sec_kalman, 60.0)
    s.section("parallel", sec_parallel, 25.0)
    if not build_done:  # the build has had the Kalman sections' time to finish
        s.section("mamba_scan", sec_mamba_scan, 40.0, build)
    s.section("training", sec_training, 30.0)
    s.save()


if __name__ == "__main__":
    main()
