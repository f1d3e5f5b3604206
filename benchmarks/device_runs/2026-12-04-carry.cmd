# 2026-12-04 issue 15 device calls (scan kernels: CARRY_IN_SCAN, ROW_ATOMICS, MAXNREG; the fused
# Kalman GPU tests). Carried: .whl, .anchors (mamba-ssm's scan sources), .devdata; run from the
# repository root as 'bash .devdata/<name>.sh'. Each script is given whole, in the state it ran.

# ===== .devdata/s1.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
git log --oneline | head -1
date -u
BUDGET_S=430 MAMBA_JOBS=8 timeout -k 5 560 bash benchmarks/scan_bwd_session.sh --set carry --workers 8 --lengths 16384,4096,1024,65536
date -u

# ===== .devdata/s2.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
date -u
BUDGET_S=260 MAMBA_JOBS=8 timeout -k 5 330 bash benchmarks/scan_bwd_session.sh --set carry2 --workers 8 --lengths 16384,4096,1024,65536
date -u
# the fused Kalman filter's GPU tests, one case per launch, in 8 shards
python3 -m pytest --collect-only -q -m gpu -p no:cacheprovider tests/kalman/test_fused_triton.py tests/kalman/test_fused_grad.py 2>/dev/null | grep "::" > /tmp/ids.txt
wc -l < /tmp/ids.txt
for i in 0 1 2 3 4 5 6 7; do
  awk -v i=$i 'NR % 8 == i' /tmp/ids.txt > /tmp/ids_$i.txt
  (timeout 230 python3 -m pytest -q -p no:cacheprovider -m gpu $(cat /tmp/ids_$i.txt) > /tmp/kt_$i.log 2>&1; echo "shard $i rc $?" >> /tmp/kt_$i.log) &
done
wait
for i in 0 1 2 3 4 5 6 7; do tail -3 /tmp/kt_$i.log; done
cat /tmp/kt_*.log > $OUT/kalman_gpu_tests.log
date -u

# ===== .devdata/s3.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
date -u
. benchmarks/mamba_build.sh
mkdir -p $OUT/logs
mamba_build_start $OUT/logs 8
(timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ssm/test_scan_triton.py > $OUT/logs/scan_gpu.log 2>&1; echo "rc $?" >> $OUT/logs/scan_gpu.log) &
i=0
for id in "tests/kalman/test_fused_triton.py::test_gpu_matches_sequential[2-1-False-dtype1-1000-kw1]" \
  "tests/kalman/test_fused_triton.py::test_gpu_matches_sequential[2-1-False-dtype6-1000-kw6]" \
  "tests/kalman/test_fused_triton.py::test_gpu_matches_sequential[2-1-False-dtype9-1003-kw9]" \
  "tests/kalman/test_fused_triton.py::test_gpu_matches_sequential[3-2-False-dtype14-1003-kw14]" \
  "tests/kalman/test_fused_grad.py::test_gpu_gradients_match_sequential[2-1-True-dtype0]"; do
  (timeout 320 python3 -m pytest -q -p no:cacheprovider -m gpu "$id" > $OUT/logs/k_$i.log 2>&1; echo "rc $? $id" >> $OUT/logs/k_$i.log) &
  i=$((i+1))
done
wait
date -u
for f in $OUT/logs/scan_gpu.log $OUT/logs/k_*.log; do tail -2 $f; done
cat $OUT/logs/mamba_build.rc 2>/dev/null
export PYTHONPATH=/tmp/mamba_ssm_build:$PYTHONPATH
timeout 150 python3 .devdata/confirm.py
mamba_build_stop $OUT/logs
date -u

# ===== .devdata/confirm.py
"""The scan's module defaults against mamba-ssm's CUDA scan, one run (device call 3)."""
import sys, contextlib, json
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
import gpu_session as gs
import peers
from scan_bwd_session import time_impl
bw = gs.copy_bandwidth()
print(f"copy bandwidth {bw/1e9:.0f} GB/s; mamba-ssm importable: {peers.mamba_ssm() is not None}")
rows = []
class S: dry = False
for L in (16384, 4096, 65536):
    for dt in (torch.bfloat16, torch.float32):
        inp = gs.scan_inputs(L, dt, grad=True)
        g = torch.Generator(device="cuda").manual_seed(L + 1)
        dout = torch.randn(inp["u"].shape, generator=g, device="cuda", dtype=dt)
        fl_f, fl_fb = gs.floor_bytes(L, dt)
        res = {}
        for name in ("tsssm defaults", "mamba-ssm"):
            if name == "mamba-ssm" and peers.mamba_ssm() is None:
                continue
            call = gs.mamba_call(inp) if name == "mamba-ssm" else gs.tsssm_call(inp)
            r = time_impl(S, call, inp, dout, contextlib.nullcontext(), peak=True)
            r["got"] = gs.outputs_and_grads(call, inp, dout)
            res[name] = r
        t, m = res["tsssm defaults"], res.get("mamba-ssm")
        line = dict(dtype=str(dt)[6:], L=L, fwd=t["fwd_ms"], fwd_bwd=t["fwd_bwd_ms"], bwd=t["bwd_ms"],
                    peak=t["fwd_bwd_peak_MB"], fwd_x_floor=t["fwd_ms"] / (fl_f / bw * 1e3))
        if m:
            line.update(m_fwd=m["fwd_ms"], m_fwd_bwd=m["fwd_bwd_ms"], m_bwd=m["bwd_ms"], m_peak=m["fwd_bwd_peak_MB"],
                        r_fwd=m["fwd_ms"] / t["fwd_ms"], r_fwd_bwd=m["fwd_bwd_ms"] / t["fwd_bwd_ms"],
                        r_bwd=m["bwd_ms"] / t["bwd_ms"],
                        worst_rel=max(gs.rel_errors(t["got"], m["got"]).values()))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()}), flush=True)
        del inp, dout, res
        torch.cuda.empty_cache()

# ===== .devdata/s4.sh (call 4)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
date -u
. benchmarks/mamba_build.sh
mkdir -p $OUT/logs
mamba_build_start $OUT/logs 10
export PYTHONPATH=/tmp/mamba_ssm_build:$PYTHONPATH
timeout 330 python3 .devdata/fwd_shapes.py $OUT/logs/mamba_build.rc
mamba_build_stop $OUT/logs
date -u

# ===== .devdata/fwd_shapes.py (call 4)
"""Inference-forward launch shapes of the scan (CARRY_IN_SCAN on; shorter chunks: fewer shuffle
rounds per element, offline SASS), verified then timed against the module default and
mamba-ssm's forward in one run (device call 4, 2026-12-04)."""
import sys, json, time, concurrent.futures as cf, os
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
import gpu_session as gs
from tsssm.ssm import scan_triton as st

def variant(dt, **over):
    dtype = getattr(torch, dt)
    fwd = {**st.launch_config("fwd", dtype), **over}
    return dict(fwd=fwd, fwd_train=st.launch_config("fwd_train", dtype),
                bwd=st.launch_config("bwd", dtype), atomic=True, sem="relaxed")

SHAPES = {"bfloat16": {"default": {}, "d16 L32 w2": dict(BLOCK_D=16, BLOCK_L=32, num_warps=2),
                       "d32 L16 w2": dict(BLOCK_D=32, BLOCK_L=16, num_warps=2),
                       "d64 L16 w4": dict(BLOCK_D=64, BLOCK_L=16, num_warps=4),
                       "d16 L16 w1": dict(BLOCK_D=16, BLOCK_L=16, num_warps=1),
                       "d32 L32 w4": dict(BLOCK_D=32, BLOCK_L=32, num_warps=4)},
          "float32": {"default": {}, "carry d16 L16 w1": dict(CARRY_IN_SCAN=1, BLOCK_D=16, BLOCK_L=16, num_warps=1),
                      "carry d32 L16 w2 mr128": dict(CARRY_IN_SCAN=1, BLOCK_D=32, BLOCK_L=16, num_warps=2, MAXNREG=128),
                      "d32 L16 w2": dict(BLOCK_D=32, BLOCK_L=16, num_warps=2),
                      "d16 L32 w2": dict(BLOCK_D=16, BLOCK_L=32, num_warps=2),
                      "carry d16 L32 w2 mr128": dict(CARRY_IN_SCAN=1, BLOCK_D=16, BLOCK_L=32, num_warps=2, MAXNREG=128)}}

def poison():
    st._empty = lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)

def verify(args):
    dt, name = args
    poison()
    return dt, name, gs.verify_variant(variant(dt, **SHAPES[dt][name]), getattr(torch, dt), False, 1024, 64)

if __name__ == "__main__":
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    jobs = [(dt, n) for dt in SHAPES for n in SHAPES[dt]]
    t0 = time.time()
    with cf.ProcessPoolExecutor(8, mp_context=ctx) as ex:
        ok = {(dt, n): r for dt, n, r in ex.map(verify, jobs)}
    print(f"verified in {time.time()-t0:.0f} s:", {f"{k[0]} {k[1]}": (r["ok"], f"{r['worst_rel_err']:.1e}") for k, r in ok.items()}, flush=True)
    # wait for the mamba-ssm build (background, same call)
    import peers
    for _ in range(150):
        if os.path.exists(sys.argv[1]) or peers.mamba_ssm() is not None:
            break
        time.sleep(2)
    have_mamba = peers.mamba_ssm() is not None
    print("mamba-ssm importable:", have_mamba, flush=True)
    bw = gs.copy_bandwidth()
    for L in (16384, 65536):
        for dt in SHAPES:
            dtype = getattr(torch, dt)
            inp = gs.scan_inputs(L, dtype, grad=False)
            fl_f, _ = gs.floor_bytes(L, dtype)
            row = {}
            with torch.no_grad():
                for n, over in SHAPES[dt].items():
                    if not ok[(dt, n)]["ok"]:
                        row[n] = "not verified"; continue
                    with gs.scan_variant(variant(dt, **over)):
                        row[n] = round(gs.bench_ms(gs.tsssm_call(inp)), 4)
                if have_mamba:
                    row["mamba-ssm"] = round(gs.bench_ms(gs.mamba_call(inp)), 4)
            floor_ms = fl_f / bw * 1e3
            print(json.dumps({"dtype": dt, "L": L, "floor_ms": round(floor_ms, 4), "fwd_ms": row}), flush=True)
            del inp
            torch.cuda.empty_cache()

# ===== .devdata/s5.sh (call 5)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
date -u
. benchmarks/mamba_build.sh
mkdir -p $OUT/logs
mamba_build_start $OUT/logs 10
export PYTHONPATH=/tmp/mamba_ssm_build:$PYTHONPATH
timeout 200 python3 .devdata/fwd_unroll.py $OUT/logs/mamba_build.rc
mamba_build_stop $OUT/logs
date -u

# ===== .devdata/fwd_unroll.py (call 5)
"""Inference-forward launch shapes of the scan: 8 or 16 states per iteration (static_range),
verified then timed against the module default and
mamba-ssm's forward in one run (device call 5, 2026-12-04: states per iteration)."""
import sys, json, time, concurrent.futures as cf, os
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
import gpu_session as gs
from tsssm.ssm import scan_triton as st

def variant(dt, **over):
    dtype = getattr(torch, dt)
    fwd = {**st.launch_config("fwd", dtype), **over}
    return dict(fwd=fwd, fwd_train=st.launch_config("fwd_train", dtype),
                bwd=st.launch_config("bwd", dtype), atomic=True, sem="relaxed")

SHAPES = {"bfloat16": {"default": {}, "unroll 8": dict(UNROLL=8), "unroll 16": dict(UNROLL=16),
                       "unroll 8, d8 w2": dict(UNROLL=8, BLOCK_D=8, num_warps=2)},
          "float32": {"default": {}, "unroll 8": dict(UNROLL=8), "unroll 16": dict(UNROLL=16),
                      "carry unroll 8 mr128": dict(UNROLL=8, CARRY_IN_SCAN=1, MAXNREG=128)}}

def poison():
    st._empty = lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)

def verify(args):
    dt, name = args
    poison()
    return dt, name, gs.verify_variant(variant(dt, **SHAPES[dt][name]), getattr(torch, dt), False, 1024, 64)

if __name__ == "__main__":
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    jobs = [(dt, n) for dt in SHAPES for n in SHAPES[dt]]
    t0 = time.time()
    with cf.ProcessPoolExecutor(8, mp_context=ctx) as ex:
        ok = {(dt, n): r for dt, n, r in ex.map(verify, jobs)}
    print(f"verified in {time.time()-t0:.0f} s:", {f"{k[0]} {k[1]}": (r["ok"], f"{r['worst_rel_err']:.1e}") for k, r in ok.items()}, flush=True)
    # wait for the mamba-ssm build (background, same call)
    import peers
    for _ in range(150):
        if os.path.exists(sys.argv[1]) or peers.mamba_ssm() is not None:
            break
        time.sleep(2)
    have_mamba = peers.mamba_ssm() is not None
    print("mamba-ssm importable:", have_mamba, flush=True)
    bw = gs.copy_bandwidth()
    for L in (16384, 65536):
        for dt in SHAPES:
            dtype = getattr(torch, dt)
            inp = gs.scan_inputs(L, dtype, grad=False)
            fl_f, _ = gs.floor_bytes(L, dtype)
            row = {}
            with torch.no_grad():
                for n, over in SHAPES[dt].items():
                    if not ok[(dt, n)]["ok"]:
                        row[n] = "not verified"; continue
                    with gs.scan_variant(variant(dt, **over)):
                        row[n] = round(gs.bench_ms(gs.tsssm_call(inp)), 4)
                if have_mamba:
                    row["mamba-ssm"] = round(gs.bench_ms(gs.mamba_call(inp)), 4)
            floor_ms = fl_f / bw * 1e3
            print(json.dumps({"dtype": dt, "L": L, "floor_ms": round(floor_ms, 4), "fwd_ms": row}), flush=True)
            del inp
            torch.cuda.empty_cache()
