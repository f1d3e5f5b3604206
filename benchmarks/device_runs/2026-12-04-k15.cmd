# 2026-12-04 issue 15 (and issue 8's cross-CPU check) device calls: the scripts, carried in an ignored
# .devdata/ (with .whl for call 1 and SKAB's data/ as .devdata/skab) and run from the repository root
# as 'bash .devdata/<name>.sh'. Each script is given whole below, in the state it ran.

# ===== .devdata/d1.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
lscpu | grep -i "model name"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch,numpy;print('torch',torch.__version__,'numpy',numpy.__version__)"
# cross-CPU check of the converged var_kalman fit (and the old 4-epoch default), in the background
for e in 50 4; do
  d=/tmp/vk$e; mkdir -p $d
  (timeout 420 python3 -m tsssm.cli train data=skab data.root=$PWD/.devdata/skab model=var_kalman task=anomaly trainer=cpu seed=0 tracking.uri=file://$d/mlruns tracking.artifact_root=$d/artifacts tracking.output_dir=$d trainer.enable_progress_bar=false trainer.threads=1 model.epochs=$e > $OUT/vk$e.log 2>&1; echo "vk$e rc=$?" >> $OUT/vk$e.log) &
done
timeout 200 python3 .devdata/kdiag.py $OUT 2>&1 | tail -n 80
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 150 $NCU -k regex:_scan_ --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section InstructionStats --section ComputeWorkloadAnalysis --section LaunchStats python3 .devdata/scanncu.py > $OUT/ncu_scan.txt 2>&1; echo "ncu rc=$?"
grep -E "_scan_|Duration|Registers Per|Achieved Occupancy|Issued Warp|No Eligible|Warp Cycles Per Issued|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc|Stall" $OUT/ncu_scan.txt | head -80
wait
for e in 50 4; do tail -n 4 $OUT/vk$e.log | cut -c1-300; done
python3 - <<'P'
import mlflow
for e in (50, 4):
    mlflow.set_tracking_uri(f"file:///tmp/vk{e}/mlruns")
    runs = mlflow.search_runs(experiment_names=["tsssm"], output_format="list")
    for r in runs:
        m = r.data.metrics
        print(e, r.info.run_name, {k: round(m[k], 6) for k in ("train/threshold", "train/nll_one_step", "val/nll_one_step", "test/f1", "test/far", "test/mar") if k in m})
P

# ===== .devdata/kdiag.py
"""Issue 15 diagnostics on the H200: where the fused Kalman call's time goes (host vs kernel)."""
import cProfile, io, pstats, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
import kalman as kb
from gpu_session import bench_ms, simulate_llt, copy_bandwidth
from tsssm.kalman.fused_triton import fused_kalman_filter, DEFAULT_OUTPUTS
from torch.profiler import ProfilerActivity, profile

out = Path(sys.argv[1])
bw = copy_bandwidth()
M = kb.model_matrices("llt")
S = T = 10_000
y = torch.from_numpy(simulate_llt(M, S, T, seed=7)).cuda()[..., None].float()
ssm = kb.tsssm_model(M, torch.float32, "cuda")
floor = kb.fused_bytes(S, T, 2, 1, 4, DEFAULT_OUTPUTS) / bw * 1e3
print(f"copy bw {bw/1e9:.0f} GB/s floor {floor:.3f} ms", flush=True)
variants = [("default", {}), ("rotate4 ll_chunk", dict(rotate=True, prefetch=4, ll_chunk=True)),
            ("2/thread rotate4 ll_chunk", dict(rotate=True, prefetch=4, ll_chunk=True, series_per_thread=2))]
for label, kw in variants:
    fn = lambda kw=kw: fused_kalman_filter(ssm, y, **kw)
    fn(); torch.cuda.synchronize()
    call = bench_ms(fn)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    kern = tot = 0.0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0.0)
        if "_kalman_fused" in e.key:
            kern += t
        if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            tot += t
    # host time of one call with the GPU idle before it (what do_bench sees inside its events)
    ts = []
    for _ in range(20):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    print(f"{label}: call {call:.3f} ms ({call/floor:.2f}x floor), kernel {kern/10/1e3:.3f} ms "
          f"({kern/10/1e3/floor:.2f}x), all kernels {tot/10/1e3:.3f} ms, wall median {ts[10]:.3f} ms", flush=True)
    if label == "rotate4 ll_chunk":
        (out / "kalman_call_profile.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        pr = cProfile.Profile(); pr.enable()
        for _ in range(50):
            fn()
        torch.cuda.synchronize(); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
        (out / "kalman_call_cprofile.txt").write_text(s.getvalue())
        print(s.getvalue()[:6000], flush=True)

# ===== .devdata/scanncu.py
"""One forward and one forward+backward of the scan, bf16 and fp32, L 16k, for ncu."""
import sys
sys.path.insert(0, "benchmarks")
import torch
from scan import make_inputs
from tsssm.ssm.scan import selective_scan
for dt in (torch.bfloat16, torch.float32):
    inp = make_inputs(16384, dt, grad=True)
    with torch.no_grad():
        selective_scan(**inp, delta_softplus=True, backend="triton")
    out = selective_scan(**inp, delta_softplus=True, backend="triton")
    out.float().sum().backward()
    torch.cuda.synchronize()

# ===== .devdata/d2.sh
set -u
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
git log --oneline -1 2>/dev/null || true
timeout 300 python3 -m pytest -q -m gpu tests/kalman/test_fused_triton.py tests/kalman/test_fused_grad.py -p no:cacheprovider 2>&1 | tail -n 4
timeout 150 python3 .devdata/kdiag2.py $OUT 2>&1 | grep -v Warn | head -n 60

# ===== .devdata/kdiag2.py
"""Issue 15 diagnostics on the H200: where the fused Kalman call's time goes (host vs kernel)."""
import cProfile, io, pstats, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
import kalman as kb
from gpu_session import bench_ms, simulate_llt, copy_bandwidth
from tsssm.kalman.fused_triton import fused_kalman_filter, DEFAULT_OUTPUTS
from torch.profiler import ProfilerActivity, profile

out = Path(sys.argv[1])
bw = copy_bandwidth()
M = kb.model_matrices("llt")
S = T = 10_000
y = torch.from_numpy(simulate_llt(M, S, T, seed=7)).cuda()[..., None].float()
ssm = kb.tsssm_model(M, torch.float32, "cuda")
floor = kb.fused_bytes(S, T, 2, 1, 4, DEFAULT_OUTPUTS) / bw * 1e3
print(f"copy bw {bw/1e9:.0f} GB/s floor {floor:.3f} ms", flush=True)
variants = [("new default (memo, rotate 4, ll_chunk)", {}),
            ("old default (prefetch 1)", dict(prefetch=1, rotate=False, ll_chunk=False)),
            ("new default, 2 series per thread", dict(series_per_thread=2))]
for label, kw in variants:
    fn = lambda kw=kw: fused_kalman_filter(ssm, y, **kw)
    fn(); torch.cuda.synchronize()
    call = bench_ms(fn)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    kern = tot = 0.0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0.0)
        if "_kalman_fused" in e.key:
            kern += t
        if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            tot += t
    # host time of one call with the GPU idle before it (what do_bench sees inside its events)
    ts = []
    for _ in range(20):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    print(f"{label}: call {call:.3f} ms ({call/floor:.2f}x floor), kernel {kern/10/1e3:.3f} ms "
          f"({kern/10/1e3/floor:.2f}x), all kernels {tot/10/1e3:.3f} ms, wall median {ts[10]:.3f} ms", flush=True)
    if label.startswith("new default ("):
        (out / "kalman_call_profile.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        pr = cProfile.Profile(); pr.enable()
        for _ in range(50):
            fn()
        torch.cuda.synchronize(); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
        (out / "kalman_call_cprofile.txt").write_text(s.getvalue())
        print(s.getvalue()[:6000], flush=True)

# ===== .devdata/d3.sh
set -u
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
timeout 150 python3 .devdata/kdiag2.py $OUT 2>&1 | grep -v -i warn | grep -E "floor|call" | head -n 12
timeout 400 python3 -m pytest -v -m gpu tests/kalman/test_fused_triton.py tests/kalman/test_fused_grad.py -p no:cacheprovider --durations=8 > $OUT/pytest_gpu.log 2>&1; echo "pytest rc=$?"
grep -E "PASSED|FAILED|ERROR|passed|failed|s call|s setup" $OUT/pytest_gpu.log | tail -n 30

# ===== .devdata/kcheck.py
"""GPU check of the fused filter's new defaults and the structure memo against the float64
sequential filter, every output NaN-poisoned (tests' helpers)."""
import sys, time
sys.path.insert(0, "tests/helpers"); sys.path.insert(0, "tests/kalman")
import torch
from triton_cases import local_linear_trend, nan_filled_empty, to, random_y
from tsssm.kalman import kalman_filter
from tsssm.kalman.fused_triton import fused_kalman_filter, STRUCTURES
dev = torch.device("cuda")
fails = 0
for dtype, tol in ((torch.float32, 2e-3), (torch.float64, 1e-9)):
    for T, missing in ((1000, 0.0), (1000, 0.1), (1003, 0.1), (4000, 0.0)):
        t0 = time.time()
        gen = torch.Generator().manual_seed(T)
        ssm = local_linear_trend()
        y = random_y(gen, (300, T, 1), missing, whole_step=2)
        ref = kalman_filter(to(ssm, torch.float64, dev), y.to(dev))
        m = to(ssm, dtype, dev)
        for call in range(2):  # the second call launches on the memo's structure
            with nan_filled_empty() as poisoned:
                res = fused_kalman_filter(m, y.to(dev, dtype))
            assert poisoned
            errs = {}
            for f in ("loglik", "log_liks", "filtered_mean", "innovation", "nis"):
                a, b = getattr(res, f).double(), getattr(ref, f).double()
                ok = torch.isfinite(a).all() and torch.allclose(a, b, rtol=tol, atol=tol)
                errs[f] = float(((a - b).abs() / (b.abs() + 1)).max())
                fails += 0 if ok else 1
            print(f"{str(dtype)[6:]} T={T} missing={missing} call {call}: max rel err {errs} ({time.time()-t0:.1f}s)", flush=True)
        m.F.data[0, 1] = 0.5  # structure changed behind the memo's back
        ref2 = kalman_filter(to(m, torch.float64, dev), y.to(dev))
        with nan_filled_empty():
            res = fused_kalman_filter(m, y.to(dev, dtype))
        ok = torch.allclose(res.loglik.double(), ref2.loglik, rtol=tol, atol=tol)
        fails += 0 if ok else 1
        print(f"  after F.data change: loglik ok {bool(ok)}", flush=True)
print("KCHECK", "FAILED" if fails else "OK", fails)

# ===== .devdata/d4.sh
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
timeout 300 python3 .devdata/kcheck.py 2>&1 | tail -n 30
