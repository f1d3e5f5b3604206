"""The selective scan's backward on one GPU: verify, sweep the backward's kernel switches, then
tsssm vs mamba-ssm's CUDA kernel side by side, with per-launch kernel times from torch.profiler.

Run by ``benchmarks/scan_bwd_session.sh`` (which builds mamba-ssm's extension in the
background from ``.anchors/mamba_ssm_scan``), from the repository root::

    python3 benchmarks/scan_bwd_session.py --out DIR [--budget-s 225] [--mamba-build DIR]

1. Worker processes verify, and so compile, every variant timed below: forward and every
   gradient against the float64 torch path on fresh inputs, every output buffer of the
   launchers filled with NaN first (batch 2, dim 64, L 1024: the same integer specialisations
   as the timed shapes, so the timing hits Triton's cache); ``pytest -m gpu`` on
   tests/ssm/test_scan_triton.py (the module defaults) at the same time. A variant that fails
   is not timed.
2. Sweep at L 16k, bf16 and fp32 (batch 8, dim 1024, N 16, z, D, delta_bias, softplus):
   training variants (fwd+bwd and bwd alone), inference-forward variants.
3. Table: main's shapes (MAIN_FWD, MAIN_BWD), the sweep's best and mamba-ssm at L 1k, 16k,
   64k: forward, forward+backward, backward alone, peak memory, times the memory floor; agreement of
   mamba-ssm's output and gradients with tsssm's at 16k.
4. torch.profiler: CUDA kernel times per launch of one forward+backward, tsssm's best and
   mamba-ssm's, bf16 and fp32 at 16k.

Writes results.json (rewritten after every step), table.md (also printed) and profile.md under
--out. ``--dry-run``: the code paths on the CPU under the Triton interpreter at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import os
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

import gpu_session as gs  # noqa: E402
import torch  # noqa: E402

DTYPES = ("bfloat16", "float32")


#: The launch shapes on main before this session's changes (both dtypes): what "main" times.
MAIN_FWD = {"BC_2D": 0, "BLOCK_D": 16, "BLOCK_L": 64, "num_warps": 4, "UNROLL": 4, "PREFETCH": 1}
MAIN_BWD = {"BC_2D": 0, "STATE_PREFETCH": 0, "BLOCK_D": 4, "num_warps": 1, "UNROLL": 2,
            "PREFETCH": 0}


#: Which variants a session sweeps: "kern2" (the session of 2026-12-01, against main's shapes
#: of that day, the same in both dtypes) or "carry" (2026-12-04: the module's current defaults
#: per dtype, with and without the carried state taken into the chunk scan, CARRY_IN_SCAN, and
#: the backward's dB/dC atomics per channel row, ROW_ATOMICS).
#: "carry2" (2026-12-04, second call): the combinations the first "carry" call pointed to, and
#: MAXNREG (ptxas held to 128 registers: float32's CARRY_IN_SCAN forward took 140 offline and
#: ran 35% slower, as 3 programs per SM instead of 4).
VARIANT_SETS = ("kern2", "carry", "carry2")


#: The module's launch shapes from 2026-12-01 to the "carry" sessions of 2026-12-04 (per-dtype
#: overrides applied), the base of the "carry" and "carry2" sets: pinned here, so that those
#: sets time what they timed then whatever the module's defaults become.
_SHAPE = {"BLOCK_D": 16, "BLOCK_L": 64, "num_warps": 4, "UNROLL": 4}
DEFAULTS_BEFORE_CARRY = {
    "bfloat16": dict(fwd={**_SHAPE, "PREFETCH": 1, "BC_2D": 1},
                     fwd_train={**_SHAPE, "PREFETCH": 0, "BC_2D": 1}),
    "float32": dict(fwd={**_SHAPE, "PREFETCH": 0, "BC_2D": 1},
                    fwd_train={**_SHAPE, "PREFETCH": 0, "BC_2D": 0}),
}
BWD_BEFORE_CARRY = {"BLOCK_D": 4, "num_warps": 1, "UNROLL": 1, "PREFETCH": 0, "BC_2D": 1,
                    "STATE_PREFETCH": 1}


def defaults_variant(dt: str) -> dict:
    """DEFAULTS_BEFORE_CARRY for dtype ``dt`` as a variant, with the switches that the "carry"
    sets try spelled out (off)."""
    off = {"CARRY_IN_SCAN": 0, "MAXNREG": 0}
    shapes = DEFAULTS_BEFORE_CARRY[dt]
    return dict(fwd={**off, **shapes["fwd"]}, fwd_train={**off, **shapes["fwd_train"]},
                bwd={**off, "ROW_ATOMICS": 0, **BWD_BEFORE_CARRY}, atomic=True, sem="relaxed")


def _before_carry(dt: str, fwd: dict | None = None, fwd_train: dict | None = None,
                  bwd: dict | None = None) -> dict:
    """defaults_variant(dt) with some keys of its fwd / fwd_train / bwd changed."""
    out = json.loads(json.dumps(defaults_variant(dt)))
    for kind, over in (("fwd", fwd), ("fwd_train", fwd_train), ("bwd", bwd)):
        out[kind].update(over or {})
    return out


def carry_train_variants(dt: str) -> dict[str, dict]:
    """The "carry" set's training variants for dtype ``dt``, the old defaults first."""
    carry = dict(CARRY_IN_SCAN=1)
    both = dict(carry, ROW_ATOMICS=1)

    def v(fwd_train=None, **bwd):
        return _before_carry(dt, fwd_train=fwd_train, bwd=bwd)

    return {
        "main": v(),
        "carry": v(carry, **carry),
        "rowatomic": v(ROW_ATOMICS=1),
        "carry+rowatomic": v(carry, **both),
        "carry+rowatomic nosp": v(carry, STATE_PREFETCH=0, **both),
        "carry+rowatomic bwd d8 w2": v(carry, BLOCK_D=8, num_warps=2, **both),
        "carry+rowatomic bwd d2": v(carry, BLOCK_D=2, **both),
    }


def carry_fwd_variants(dt: str) -> dict[str, dict]:
    """The "carry" set's inference-forward variants (the rest is the old defaults')."""
    def v(**over):
        return _before_carry(dt, fwd=over)

    other_pf = 1 - int(DEFAULTS_BEFORE_CARRY[dt]["fwd"].get("PREFETCH", 0))
    return {"main": v(), "carry": v(CARRY_IN_SCAN=1),
            "carry pf flipped": v(CARRY_IN_SCAN=1, PREFETCH=other_pf),
            "carry d8 w2": v(CARRY_IN_SCAN=1, BLOCK_D=8, num_warps=2),
            "carry d8 L128": v(CARRY_IN_SCAN=1, BLOCK_D=8, BLOCK_L=128)}


def carry2_train_variants(dt: str) -> dict[str, dict]:
    """The "carry2" set's training variants for dtype ``dt``, the old defaults first."""
    bwd = dict(CARRY_IN_SCAN=1, ROW_ATOMICS=1, BLOCK_D=2)

    def v(fwd_train=None, with_bwd=True):
        return _before_carry(dt, fwd_train=fwd_train, bwd=bwd if with_bwd else None)

    return {
        "main": v(with_bwd=False),
        "bwd carry+rowatomic d2": v(),
        "fwd carry, bwd carry+rowatomic d2": v(dict(CARRY_IN_SCAN=1)),
        "fwd carry mr128, bwd carry+rowatomic d2": v(dict(CARRY_IN_SCAN=1, MAXNREG=128)),
        "fwd mr128, bwd carry+rowatomic d2": v(dict(MAXNREG=128)),
    }


def carry2_fwd_variants(dt: str) -> dict[str, dict]:
    """The "carry2" set's inference-forward variants (the rest is the old defaults')."""
    def v(**over):
        return _before_carry(dt, fwd=over)

    return {"main": v(), "carry": v(CARRY_IN_SCAN=1),
            "carry mr128": v(CARRY_IN_SCAN=1, MAXNREG=128), "mr128": v(MAXNREG=128),
            "carry unroll2": v(CARRY_IN_SCAN=1, UNROLL=2)}


def train_variants(dt: str = "bfloat16", which: str = "kern2") -> dict[str, dict]:
    """name -> variant (training forward + backward), main's first. "kern2": every variant
    spells out every key, and scan_variant clears the per-dtype overrides: the same shapes in
    both dtypes. "carry": carry_train_variants(dt)."""
    if which == "carry":
        return carry_train_variants(dt)
    if which == "carry2":
        return carry2_train_variants(dt)
    base = dict(fwd=dict(MAIN_FWD), fwd_train=dict(MAIN_FWD), bwd=dict(MAIN_BWD),
                atomic=True, sem="relaxed")

    def v(bwd=None, fwd_train=None):
        out = json.loads(json.dumps(base))
        out["bwd"].update(bwd or {})
        out["fwd_train"].update(fwd_train or {})
        return out

    sp = dict(BC_2D=1, STATE_PREFETCH=1)
    return {
        "main": v(),
        "bwd bc2d": v(dict(BC_2D=1)),
        "bwd bc2d+sp": v(sp),
        "bwd bc2d+sp, fwd bc2d": v(sp, dict(BC_2D=1)),
        "bwd bc2d+sp unroll1": v(dict(sp, UNROLL=1)),
        "bwd bc2d+sp unroll1, fwd pf0": v(dict(sp, UNROLL=1), dict(PREFETCH=0)),
        "bwd bc2d+sp unroll1, fwd bc2d pf0": v(dict(sp, UNROLL=1), dict(BC_2D=1, PREFETCH=0)),
        "bwd d2 bc2d": v(dict(BC_2D=1, BLOCK_D=2)),
        "bwd d2 bc2d+sp": v(dict(sp, BLOCK_D=2)),
        "bwd d2 bc2d+sp unroll1": v(dict(sp, BLOCK_D=2, UNROLL=1)),
        "L32 bwd bc2d+sp": v(sp, dict(BLOCK_L=32, BLOCK_D=16, num_warps=2)),
        # one channel per program: no dB/dC reduction across rows, atomics per channel
        "L128 bwd d1 bc2d+sp": v(dict(sp, BLOCK_D=1), dict(BLOCK_L=128, BLOCK_D=8)),
    }


def fwd_variants(dt: str = "bfloat16", which: str = "kern2") -> dict[str, dict]:
    """name -> variant whose inference forward differs (the rest is main's)."""
    if which == "carry":
        return carry_fwd_variants(dt)
    if which == "carry2":
        return carry2_fwd_variants(dt)
    base = train_variants()["main"]

    def v(**over):
        out = json.loads(json.dumps(base))
        out["fwd"].update(over)
        return out

    return {"main": v(), "fwd bc2d": v(BC_2D=1), "fwd bc2d pf0": v(BC_2D=1, PREFETCH=0),
            "fwd d8 w2 bc2d": v(BC_2D=1, BLOCK_D=8, num_warps=2),
            "fwd d8 L128 bc2d": v(BC_2D=1, BLOCK_D=8, BLOCK_L=128)}


#: A dry run (CPU, interpreter) exercises the code paths with the first variants only.
DRY_VARIANTS = 2


def _names(variants: dict, dry: bool) -> list[str]:
    return list(variants)[:DRY_VARIANTS] if dry else list(variants)


def tasks(dry: bool = False, which: str = "kern2") -> list[dict]:
    out = []
    for dt in DTYPES:
        out += [dict(kind="train", dtype=dt, name=n)
                for n in _names(train_variants(dt, which), dry)]
        out += [dict(kind="fwd", dtype=dt, name=n) for n in _names(fwd_variants(dt, which), dry)
                if n != "main"]
    return out


def task_key(t: dict) -> str:
    return f"{t['kind']}|{t['dtype']}|{t['name']}"


def poison_outputs() -> None:
    """Every output buffer of the launchers starts as NaN (an unwritten element cannot pass)."""
    from tsssm.ssm import scan_triton as st

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    st._empty = nan_empty


def run_worker(index: int, count: int, out: Path, dry: bool, which: str = "kern2") -> None:
    poison_outputs()
    L, dim = (32, 16) if dry else (1024, 64)
    with (out / f"worker_{index}.jsonl").open("w") as f:
        for i, task in enumerate(tasks(dry, which)):
            if i % count != index:
                continue
            dt = task["dtype"]
            variants = (train_variants(dt, which) if task["kind"] == "train"
                        else fwd_variants(dt, which))
            t0 = time.time()
            try:
                res = gs.verify_variant(variants[task["name"]], getattr(torch, task["dtype"]),
                                        task["kind"] == "train", L, dim)
            except Exception as err:  # noqa: BLE001 - a variant that does not compile is reported
                res = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            res["seconds"] = round(time.time() - t0, 1)
            f.write(json.dumps({"key": task_key(task), **res}) + "\n")
            f.flush()


class Session:
    def __init__(self, out: Path, budget_s: float, dry: bool, which: str = "kern2"):
        self.out, self.budget_s, self.dry, self.which = out, budget_s, dry, which
        self.t0 = time.time()
        self.results: dict = {"sections": {}}
        self.logf = (out / "log.txt").open("a")

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def log(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))


def shape(s: Session) -> dict:
    return dict(batch=1, dim=16) if s.dry else {}


def bwd_only_fn(call, inp, dout):
    """One backward through the graph of one forward (kept with retain_graph)."""
    params = [t for t in inp.values() if t.requires_grad]
    out = call()

    def f():
        for t in params:
            t.grad = None
        out.backward(dout, retain_graph=True)
    return f


def time_impl(s: Session, call, inp, dout, ctx, fwd: bool = True, peak: bool = False) -> dict:
    row = {}
    with ctx:
        if fwd:
            with torch.no_grad():
                row["fwd_ms"] = gs.bench_ms(call)
        f = gs.fwd_bwd_fn(call, inp, dout)
        row["fwd_bwd_ms"] = gs.bench_ms(f, rep_ms=150)
        row["bwd_ms"] = gs.bench_ms(bwd_only_fn(call, inp, dout), rep_ms=150)
        if peak:
            row["fwd_bwd_peak_MB"] = gs.peak_extra_mb(f)
    return row


def inputs(s: Session, L: int, dtype):
    """Inputs and upstream gradient drawn from seeds fixed by (L, dtype): every implementation
    compared at one (L, dtype) gets the very same tensors, whichever call draws them."""
    inp = gs.scan_inputs(L, dtype, grad=True, **shape(s))
    g = torch.Generator(device=inp["u"].device).manual_seed(L + 1)
    dout = torch.randn(inp["u"].shape, generator=g, device=inp["u"].device, dtype=dtype)
    return inp, dout


def sec_sweep(s: Session, verified: dict) -> dict:
    L = 32 if s.dry else 16384
    res = {}
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        inp, dout = inputs(s, L, dtype)
        train, fwd = {}, {}
        tv, fv = train_variants(dt, s.which), fwd_variants(dt, s.which)
        for name in _names(tv, s.dry):
            v = tv[name]
            rec = verified.get(f"train|{dt}|{name}")
            if not (rec and rec.get("ok")):
                train[name] = {"skipped": "not verified", **(rec or {})}
                continue
            try:
                train[name] = time_impl(s, gs.tsssm_call(inp), inp, dout, gs.scan_variant(v),
                                        fwd=False)
            except Exception as err:  # noqa: BLE001
                train[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            s.log(f"sweep {dt} train {name}: {train[name]}")
        with torch.no_grad():
            for name in _names(fv, s.dry):
                v = fv[name]
                rec = verified.get(f"fwd|{dt}|{name}")
                if name != "main" and not (rec and rec.get("ok")):
                    fwd[name] = {"skipped": "not verified", **(rec or {})}
                    continue
                with gs.scan_variant(v):
                    fwd[name] = {"fwd_ms": gs.bench_ms(gs.tsssm_call(inp))}
                s.log(f"sweep {dt} fwd {name}: {fwd[name]}")
        timed_t = {k: r["fwd_bwd_ms"] for k, r in train.items() if "fwd_bwd_ms" in r}
        timed_f = {k: r["fwd_ms"] for k, r in fwd.items() if "fwd_ms" in r}
        best_t = min(timed_t, key=timed_t.get) if timed_t else "main"
        best_f = min(timed_f, key=timed_f.get) if timed_f else "main"
        best = json.loads(json.dumps(tv[best_t]))
        best["fwd"] = fv[best_f]["fwd"]
        res[dt] = {"L": L, "train": train, "fwd": fwd, "best_train": best_t, "best_fwd": best_f,
                   "best": best}
        del inp, dout
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res


def mamba_status(s: Session, build: Path | None, wait_until_left: float) -> str:
    """Wait for the background build (while the budget leaves ``wait_until_left`` s)."""
    import importlib

    import peers

    rc_file = s.out / "mamba_build.rc"
    if build is not None and str(build) not in sys.path:
        sys.path.insert(0, str(build))
    while True:
        if rc_file.exists():
            rc = rc_file.read_text().strip()
            if rc != "0":
                return f"build failed or missing (rc {rc})"
            importlib.invalidate_caches()
            return "importable" if peers.mamba_ssm() is not None else "built, not importable"
        if peers.mamba_ssm() is not None:
            return "importable"
        if s.left() < wait_until_left:
            return "build still running (budget)"
        time.sleep(2)


def rows_for(s: Session, impls: dict, Ls, agree: dict, min_left: float = 25.0) -> list[dict]:
    """Time impls (name -> variant dict, or "mamba-ssm") at each (L, dtype), in that order
    (the first L first: the one the agreement and the profile use), while ``min_left`` s of
    the budget remain."""
    import contextlib

    rows = []
    for L in Ls:
        for dt in DTYPES:
            dtype = getattr(torch, dt)
            if s.left() < min_left:
                s.log(f"table: stop before {dt} L={L} (budget)")
                return rows
            inp, dout = inputs(s, L, dtype)
            bsz, dim = (1, 16) if s.dry else (8, 1024)
            fl_f, fl_fb = gs.floor_bytes(L, dtype, batch=bsz, dim=dim)
            for name, v in impls.items():
                if isinstance(v, dict) and dt in v:  # per-dtype variants (the sweep's best)
                    v = v[dt]
                row = dict(impl=name, dtype=dt, L=L)
                try:
                    if v == "mamba-ssm":
                        ctx, call = contextlib.nullcontext(), gs.mamba_call(inp)
                    else:
                        ctx, call = gs.scan_variant(v), gs.tsssm_call(inp)
                    row.update(time_impl(s, call, inp, dout, ctx, peak=True))
                    if (32 if s.dry else 16384) == L:
                        with (gs.scan_variant(v) if v != "mamba-ssm"
                              else contextlib.nullcontext()):
                            got = gs.outputs_and_grads(call, inp, dout)
                        key = (dt, L)
                        if key not in agree:
                            agree[key] = (name, got)
                        else:
                            row["rel_err_vs"] = agree[key][0]
                            row["rel_err"] = gs.rel_errors(got, agree[key][1])
                        del got
                except Exception as err:  # noqa: BLE001
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                bw = s.results["copy_bandwidth_Bps"]
                if "fwd_ms" in row:
                    row["fwd_x_floor"] = row["fwd_ms"] / (fl_f / bw * 1e3)
                if "fwd_bwd_ms" in row:
                    row["fwd_bwd_x_floor"] = row["fwd_bwd_ms"] / (fl_fb / bw * 1e3)
                s.log(f"table {row}")
                rows.append(row)
            del inp, dout
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def kernel_profile(s: Session, impls: dict) -> list[dict]:
    """CUDA kernel time per launch of one forward+backward (3 profiled, after 2 warm-up)."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    L = 32 if s.dry else 16384
    rows = []
    for dt in DTYPES:
        inp, dout = inputs(s, L, getattr(torch, dt))
        for name, v in impls.items():
            if isinstance(v, dict) and dt in v:
                v = v[dt]
            if v == "mamba-ssm":
                ctx, call = contextlib.nullcontext(), gs.mamba_call(inp)
            else:
                ctx, call = gs.scan_variant(v), gs.tsssm_call(inp)
            try:
                with ctx:
                    f = gs.fwd_bwd_fn(call, inp, dout)
                    f()
                    f()
                    gs.sync()
                    acts = [ProfilerActivity.CPU] + (
                        [ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                    with profile(activities=acts) as prof:
                        for _ in range(3):
                            f()
                        gs.sync()
                events = list(prof.key_averages())
                # the kernels; the CPU-side ops report their kernels' time as theirs too
                kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]
                for e in kernels or events:
                    # self time: the kernels' own; an op's total would count its kernels twice
                    dev_us = getattr(e, "self_device_time_total", None)
                    if dev_us is None:
                        dev_us = getattr(e, "self_cuda_time_total", 0.0)
                    if not dev_us:
                        continue
                    rows.append(dict(impl=name, dtype=dt, L=L, kernel=e.key[:90],
                                     launches_per_iter=e.count / 3,
                                     ms_per_iter=dev_us / 3 / 1e3,
                                     ms_per_launch=dev_us / max(e.count, 1) / 1e3))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(impl=name, dtype=dt, error=f"{type(err).__name__}: {err}"[:300]))
        del inp, dout
    return rows


def _f(x, fmt="{:.3g}") -> str:
    return "" if x is None else (fmt.format(x) if isinstance(x, float) else str(x))


def tables(results: dict) -> str:
    lines = [f"# Selective-scan backward session {results.get('started', '')}: "
             f"{results.get('device', '')}, torch {results.get('torch', '')}, triton "
             f"{results.get('triton', '')}, copy bandwidth "
             f"{_f(results.get('copy_bandwidth_Bps', 0) / 1e9, '{:.0f}')} GB/s", ""]
    ver = results.get("verified", {})
    bad = {k: r for k, r in ver.items() if not r.get("ok")}
    lines.append(f"verified on the GPU (fwd + every grad vs float64, NaN-poisoned outputs): "
                 f"{len(ver) - len(bad)} ok, {len(bad)} failed {sorted(bad) if bad else ''}")
    worst = max((r.get("worst_rel_err", 0) for r in ver.values() if r.get("ok")), default=None)
    lines.append(f"worst rel err of a passing variant: {_f(worst)}; pytest -m gpu: "
                 f"{results.get('pytest_gpu', 'not run')}")
    sweep = results["sections"].get("sweep", {})
    for dt, r in sweep.items():
        if not isinstance(r, dict) or "train" not in r:
            continue
        lines += ["", f"## Sweep {dt}, L {r['L']} (ms)", "",
                  "| training variant | fwd+bwd | bwd |", "|---|---:|---:|"]
        for n, t in r["train"].items():
            lines.append(f"| {n} | {_f(t.get('fwd_bwd_ms'))} | {_f(t.get('bwd_ms'))} |"
                         + ("" if "fwd_bwd_ms" in t else f" {t}"[:160]))
        lines += ["", "| forward variant | fwd |", "|---|---:|"]
        for n, t in r["fwd"].items():
            lines.append(f"| {n} | {_f(t.get('fwd_ms'))} |")
        lines.append(f"best: train `{r['best_train']}`, fwd `{r['best_fwd']}`: "
                     f"{json.dumps(r['best'])}")
    rows = results["sections"].get("table", []) + results["sections"].get("mamba", [])
    if rows:
        lines += ["", "## tsssm vs mamba-ssm (batch 8, dim 1024, N 16, z, D, delta_bias, "
                  "softplus)", "",
                  "| impl | dtype | L | fwd ms | fwd x floor | fwd+bwd ms | bwd ms | "
                  "fwd+bwd x floor | peak MB | mamba/this fwd | mamba/this fwd+bwd | "
                  "mamba/this bwd |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        mam = {(r["dtype"], r["L"]): r for r in rows if r["impl"] == "mamba-ssm"}
        for r in sorted(rows, key=lambda r: (r["dtype"], r["L"], r["impl"])):
            m = mam.get((r["dtype"], r["L"]), {})

            def ratio(k, r=r, m=m):
                return _f(m[k] / r[k], "{:.2f}") if k in m and k in r and r[k] else ""
            lines.append(
                f"| {r['impl']} | {r['dtype']} | {r['L']} | {_f(r.get('fwd_ms'))} | "
                f"{_f(r.get('fwd_x_floor'), '{:.1f}')} | {_f(r.get('fwd_bwd_ms'))} | "
                f"{_f(r.get('bwd_ms'))} | {_f(r.get('fwd_bwd_x_floor'), '{:.1f}')} | "
                f"{_f(r.get('fwd_bwd_peak_MB'), '{:.0f}')} | {ratio('fwd_ms')} | "
                f"{ratio('fwd_bwd_ms')} | {ratio('bwd_ms')} |" + (f" {r['error']}" if "error" in r
                                                                   else ""))
        for r in rows:
            if "rel_err" in r:
                errs = ", ".join(f"{k} {v:.1e}" for k, v in r["rel_err"].items())
                lines.append(f"\n{r['impl']} vs {r['rel_err_vs']} ({r['dtype']} L {r['L']}): "
                             + errs)
    lines.append(f"\nmamba-ssm: {results.get('mamba_status', 'not reached')}")
    lines.append(f"elapsed {_f(results.get('elapsed_s'), '{:.0f}')} s")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    lines = ["| impl | dtype | kernel | launches / iter | ms / iter | ms / launch |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['dtype']} | error: {r['error'][:120]} | | | |")
            continue
        if r["ms_per_iter"] < 0.005:
            continue
        lines.append(f"| {r['impl']} | {r['dtype']} | `{r['kernel']}` | "
                     f"{r['launches_per_iter']:.0f} | {r['ms_per_iter']:.3f} | "
                     f"{r['ms_per_launch']:.3f} |")
    return "\n".join(lines)


def start_workers(s: Session, count: int) -> list[subprocess.Popen]:
    env = dict(os.environ)
    procs = []
    for i in range(count):
        cmd = [sys.executable, str(Path(__file__)), "--worker", str(i), "--workers", str(count),
               "--out", str(s.out), "--set", s.which] + (["--dry-run"] if s.dry else [])
        log = (s.out / f"worker_{i}.log").open("w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    if not s.dry:
        log = (s.out / "pytest_gpu.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
             "tests/ssm/test_scan_triton.py"], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=ROOT))
    return procs


def collect_workers(out: Path) -> dict:
    done = {}
    for path in sorted(out.glob("worker_*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec.pop("key")] = rec
    return done


def _lengths(text: str) -> list[int]:
    """--lengths: positive integers separated by commas."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers like 16384,4096; got {text!r}")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=225.0)
    p.add_argument("--mamba-build", default=None)
    p.add_argument("--workers", type=int, default=5)
    p.add_argument("--worker", type=int, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--set", dest="which", choices=VARIANT_SETS, default="kern2",
                   help="which variants to sweep (see VARIANT_SETS)")
    p.add_argument("--lengths", default="16384,1024,65536", type=_lengths,
                   help="the table's sequence lengths, comma-separated (the sweep runs at 16384)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        run_worker(args.worker, args.workers, out, args.dry_run, args.which)
        return
    if args.table_only:  # after a stopped run: the tables of what results.json holds
        write_tables(out, json.loads((out / "results.json").read_text()))
        return
    s = Session(out, args.budget_s, args.dry_run, args.which)
    import triton

    s.results.update(started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     torch=torch.__version__, triton=triton.__version__, variant_set=s.which)
    procs = start_workers(s, args.workers)
    s.results["copy_bandwidth_Bps"] = gs.copy_bandwidth()
    s.log(f"copy bandwidth {s.results['copy_bandwidth_Bps'] / 1e9:.0f} GB/s")
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, s.left() - 130))
        except subprocess.TimeoutExpired:
            proc.kill()
            s.log(f"worker {proc.args[-1]} stopped (budget)")
    s.results["verified"] = collect_workers(out)
    if not s.dry:
        tail = (out / "pytest_gpu.log").read_text().strip().splitlines()
        s.results["pytest_gpu"] = tail[-1] if tail else "no output"
    s.log(f"verified: {sum(r.get('ok', False) for r in s.results['verified'].values())} of "
          f"{len(s.results['verified'])}; pytest -m gpu: {s.results.get('pytest_gpu')}")
    s.save()

    def step(name, fn, *a):
        try:
            s.results["sections"][name] = fn(*a)
        except Exception:  # noqa: BLE001 - report, go on with the next step
            s.results["sections"][name] = {"error": traceback.format_exc()[-1500:]}
            s.log(f"{name} failed:\n{traceback.format_exc()[-1500:]}")
        s.results["elapsed_s"] = time.time() - s.t0
        s.save()

    step("sweep", sec_sweep, s, s.results["verified"])
    sweep = s.results["sections"]["sweep"]
    best = {dt: r["best"] for dt, r in sweep.items() if isinstance(r, dict) and "best" in r}
    ours = {"tsssm main": {dt: train_variants(dt, s.which)["main"] for dt in DTYPES},
            "tsssm best": best}
    Ls = [32] if s.dry else args.lengths
    agree: dict = {}
    step("table", rows_for, s, ours, Ls, agree)
    build = Path(args.mamba_build) if args.mamba_build else None
    s.results["mamba_status"] = "dry run" if s.dry else mamba_status(s, build, 28)
    s.log(f"mamba-ssm: {s.results['mamba_status']}")
    prof_impls = {"tsssm best": best}
    if s.results["mamba_status"] == "importable":
        step("mamba", rows_for, s, {"mamba-ssm": "mamba-ssm"}, Ls, agree, 10.0)
        prof_impls["mamba-ssm"] = "mamba-ssm"
    if s.left() > 15:
        step("profile", kernel_profile, s, prof_impls)
    s.results["elapsed_s"] = time.time() - s.t0
    s.save()
    write_tables(out, s.results)


def write_tables(out: Path, results: dict) -> None:
    """table.md and profile.md from the results; the table (and profile) printed."""
    text = tables(results)
    (out / "table.md").write_text(text + "\n")
    prof = results["sections"].get("profile")
    if isinstance(prof, list):
        (out / "profile.md").write_text(profile_table(prof) + "\n")
        text += "\n\n## Kernel times per launch (torch.profiler, L 16k)\n\n" + profile_table(prof)
    print(text, flush=True)


if __name__ == "__main__":
    main()
