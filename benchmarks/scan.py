"""Selective scan benchmark: the Triton kernels against the memory floor and the alternatives.

GPU (one call does everything; what it prints last is the table)::

    python benchmarks/scan.py --check --sweep --out $OUT

``--check`` first runs the GPU correctness tests (``pytest -m gpu tests/ssm``) and stops on a
failure; ``--sweep`` times a few launch shapes at L=16k and keeps the fastest; then forward and
forward+backward at batch 8, dim 1024, N 16 for L = 1k … 256k (1M forward in bf16 where it fits),
bf16 and fp32, each as time, ns per token (per batch·time position) and ratio to the memory floor:

- forward floor: u, delta, z, B, C read once and out written once;
- forward+backward floor: that plus the backward's own minimum (u, delta, z, B, C, dout read; du,
  ddelta, dz, dB, dC written), over the bandwidth of a large device-to-device copy measured in the
  same run (bytes read + bytes written).

Side by side at the same width: the sequential reference (L=1k), the chunked torch path, the
chunked torch path under torch.compile, and causal scaled-dot-product attention (flash, 16 heads
of 64). Writes scan_results.json, scan_table.md and scan_ns_per_token.png under --out.

CPU (the small-Mamba training shape, 2 cores)::

    python benchmarks/scan.py --cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsssm.ssm import scan_ref  # noqa: E402
from tsssm.ssm.scan import selective_scan, selective_scan_torch  # noqa: E402

BATCH, DIM, N = 8, 1024, 16


# --------------------------------------------------------------------------------------------
# Inputs, floors, timing
# --------------------------------------------------------------------------------------------


def make_inputs(L, dtype, device="cuda", batch=BATCH, dim=DIM, n=N, grad=False):
    """Mamba-like inputs: softplus(delta + bias) ~ 0.001..0.1, A = -(1..N) (S4D-real)."""
    g = torch.Generator(device=device).manual_seed(L)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):  # drawn in dt: no float32 temporary
        return torch.randn(*shape, generator=g, device=device, dtype=dt).mul_(scale).add_(shift)

    inp = dict(
        u=rnd(batch, dim, L), delta=rnd(batch, dim, L, scale=0.5), z=rnd(batch, dim, L),
        B=rnd(batch, n, L), C=rnd(batch, n, L),
        A=-torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(dim, 1),
        D=rnd(dim, dt=torch.float32),
        delta_bias=rnd(dim, scale=1.0, shift=-4.0, dt=torch.float32),
    )
    if grad:
        for t in inp.values():
            t.requires_grad_(True)
    return inp


def floor_bytes(L, dtype, batch=BATCH, dim=DIM, n=N):
    es = torch.tensor([], dtype=dtype).element_size()
    big, small = batch * dim * L * es, batch * n * L * es
    fwd = 3 * big + 2 * small + big  # u, delta, z, B, C in; out
    # backward: u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC out
    bwd = 4 * big + 2 * small + 3 * big + 2 * small
    return fwd, fwd + bwd


def bench(fn, rep_ms=200, warmup_ms=50):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth():
    n = 1 << 30  # 4 GiB of float32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep_ms=300)
    return 2 * n * 4 / (ms * 1e-3)


def peak_extra(fn):
    """(result, bytes allocated at peak beyond what was allocated before the call)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    return res, torch.cuda.max_memory_allocated() - before


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


def triton_fwd(inp):
    def f():
        with torch.no_grad():
            return selective_scan(**inp, delta_softplus=True, backend="triton")
    return f


def fwd_bwd(call, inp):
    out0 = call()
    dout = torch.randn_like(out0)
    del out0
    params = [t for t in inp.values() if t.requires_grad]

    def f():
        for p in params:
            p.grad = None
        out = call()
        out.backward(dout)
    return f


def compiled_chunk_path(compile_step=True):
    """The chunked torch path with its per-chunk step compiled by torch.compile (out of place:
    the doubling written with torch.cat so that the compiled graph is differentiable)."""

    def step(u_c, dt_c, A, B_c, C_c, h):  # time-major chunk: (T, b, d), (T, b, N), h (b, d, N)
        a = torch.exp(dt_c[..., None] * A)  # (T, b, d, N)
        x = (dt_c * u_c)[..., None] * B_c[:, :, None, :]
        x = torch.cat([x[:1] + a[:1] * h, x[1:]])
        k, T = 1, x.shape[0]
        while k < T:
            x = torch.cat([x[:k], x[k:] + a[k:] * x[:-k]])
            a = torch.cat([a[:k], a[k:] * a[:-k]])
            k *= 2
        y = (x * C_c[:, :, None, :]).sum(-1)  # (T, b, d)
        return y, x[-1]

    cstep = torch.compile(step, dynamic=False) if compile_step else step

    def run(u, delta, A, B, C, D, z, delta_bias, chunk=64):
        dt = scan_ref.discretise_delta(delta, delta_bias, True, torch.float32)
        uT, dtT = u.float().movedim(-1, 0), dt.movedim(-1, 0)
        BT, CT = B.float().movedim(-1, 0), C.float().movedim(-1, 0)
        h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device=u.device)
        ys = []
        for s in range(0, u.shape[-1], chunk):
            y, h = cstep(uT[s:s + chunk], dtT[s:s + chunk], A, BT[s:s + chunk],
                         CT[s:s + chunk], h)
            ys.append(y)
        y = torch.cat(ys).movedim(0, -1) + D[:, None] * u.float()
        return (y * torch.nn.functional.silu(z.float())).to(u.dtype)

    return run


def sdpa_inputs(L, grad):
    heads, hd = 16, DIM // 16
    q, k, v = (torch.randn(BATCH, heads, L, hd, device="cuda", dtype=torch.bfloat16,
                           requires_grad=grad) for _ in range(3))
    return q, k, v


# --------------------------------------------------------------------------------------------
# Sweep of launch shapes
# --------------------------------------------------------------------------------------------


def sweep(log):
    from tsssm.ssm import scan_triton as st

    L = 16384
    inp = make_inputs(L, torch.bfloat16, grad=True)
    # (BLOCK_D, BLOCK_L, num_warps, UNROLL) that compile with few or no register spills
    # (ptxas, sm_90a, checked off the device)
    fwd_cfgs = [(16, 64, 4, 4), (32, 64, 8, 2), (4, 64, 1, 4), (8, 64, 1, 4), (4, 128, 1, 4),
                (8, 64, 2, 4), (8, 128, 4, 4)]
    fwd_times = {}
    for cfg in fwd_cfgs:
        bd, bl, w, un = cfg
        st.FWD_CONFIG.update(BLOCK_D=bd, BLOCK_L=bl, num_warps=w, UNROLL=un)
        try:
            fwd_times[cfg] = bench(triton_fwd(inp), rep_ms=100)
        except Exception as e:  # a shape may not compile (registers): record and go on
            log(f"fwd {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        log(f"sweep fwd BLOCK_D={bd} BLOCK_L={bl} warps={w} unroll={un}: {fwd_times[cfg]:.3f} ms")
    best_fwd_by_bl = {}
    for cfg, t in fwd_times.items():
        bl = cfg[1]
        if bl not in best_fwd_by_bl or t < fwd_times[best_fwd_by_bl[bl]]:
            best_fwd_by_bl[bl] = cfg
    bwd_cfgs = {64: [(16, 4, 1), (4, 1, 1), (4, 1, 2), (8, 2, 1)],
                128: [(8, 4, 1), (2, 1, 2)]}
    bwd_times = {}
    st.BWD_ATOMIC_BC = False
    for bl in sorted(best_fwd_by_bl):
        if bl not in bwd_cfgs:
            continue
        bd_f, _, w_f, un_f = best_fwd_by_bl[bl]
        st.FWD_CONFIG.update(BLOCK_D=bd_f, BLOCK_L=bl, num_warps=w_f, UNROLL=un_f)
        for bd, w, un in bwd_cfgs[bl]:
            st.BWD_CONFIG.update(BLOCK_D=bd, num_warps=w, UNROLL=un)
            call = lambda: selective_scan(**inp, delta_softplus=True, backend="triton")  # noqa: E731
            try:
                t = bench(fwd_bwd(call, inp), rep_ms=150)
            except Exception as e:
                log(f"bwd {bl},{bd},{w},{un} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            bwd_times[(bl, bd, w, un, st.BWD_ATOMIC_BC)] = t
            log(f"sweep fwd+bwd BLOCK_L={bl} bwd BLOCK_D={bd} warps={w} unroll={un}: {t:.3f} ms")
    (bl, bd, w, un, _), _t = min(bwd_times.items(), key=lambda kv: kv[1])
    bd_f, _, w_f, un_f = best_fwd_by_bl[bl]
    st.FWD_CONFIG.update(BLOCK_D=bd_f, BLOCK_L=bl, num_warps=w_f, UNROLL=un_f)
    st.BWD_CONFIG.update(BLOCK_D=bd, num_warps=w, UNROLL=un)
    st.BWD_ATOMIC_BC = True
    call = lambda: selective_scan(**inp, delta_softplus=True, backend="triton")  # noqa: E731
    t = bench(fwd_bwd(call, inp), rep_ms=150)
    bwd_times[(bl, bd, w, un, True)] = t
    log(f"sweep fwd+bwd atomic dB/dC: {t:.3f} ms")
    # faster atomics: always; else partial sums while they fit in PARTIAL_BYTES_MAX ("auto")
    st.BWD_ATOMIC_BC = True if t < _t else "auto"
    chosen = dict(fwd=dict(st.FWD_CONFIG), bwd=dict(st.BWD_CONFIG), atomic=st.BWD_ATOMIC_BC)
    log(f"chosen: {chosen}")
    return dict(fwd={str(k): v for k, v in fwd_times.items()},
                bwd={str(k): v for k, v in bwd_times.items()}, chosen=chosen)


def verify(log):
    """The launch shapes just chosen, against the float64 torch path: forward and every gradient
    (the GPU tests ran the default shapes). Exits on a mismatch: no numbers from a wrong kernel."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 2e-2)):
        inp = make_inputs(3001, dtype, batch=2, dim=256, grad=True)
        inp64 = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
        out = selective_scan(**inp, delta_softplus=True, backend="triton")
        ref = selective_scan_torch(**inp64, delta_softplus=True, chunk=128)[0]
        w = torch.randn_like(ref)
        (out.double() * w).sum().backward()
        (ref * w).sum().backward()
        pairs = [("out", out, ref)] + [(f"d{k}", inp[k].grad, inp64[k].grad) for k in inp]
        for name, got, want in pairs:
            err = ((got.double() - want).norm() / want.norm()).item()
            if not err <= tol:  # NaN fails too
                sys.exit(f"verify {dtype} {name}: relative error {err:.2e} > {tol}")
        log(f"verify {dtype}: forward and all gradients within {tol} of float64")


# --------------------------------------------------------------------------------------------
# Main table
# --------------------------------------------------------------------------------------------


def gpu_benchmark(args):
    import triton

    t_start = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def save():
        table = markdown_table(results)
        (out_dir / "scan_table.md").write_text(table)
        plot(results, out_dir / "scan_ns_per_token.png")
        return table

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    props = torch.cuda.get_device_properties(0)
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command=" ".join(sys.argv), batch=BATCH, dim=DIM, N=N)
    bw = copy_bandwidth()
    meta["copy_bandwidth_GBs"] = bw / 1e9
    log(f"{meta}")
    results = {"meta": meta, "rows": []}
    if args.sweep:
        results["sweep"] = sweep(log)
    from tsssm.ssm import scan_triton as st

    results["meta"]["config"] = dict(fwd=st.FWD_CONFIG, bwd=st.BWD_CONFIG,
                                     atomic_bc=st.BWD_ATOMIC_BC)
    verify(log)  # the launch shapes in use, against float64, before any timing

    def record(impl, dtype, L, mode, ms, peak=None, note=""):
        fl_f, fl_fb = floor_bytes(L, dtype)
        floor_ms = (fl_f if mode == "fwd" else fl_fb) / bw * 1e3
        row = dict(impl=impl, dtype=str(dtype).replace("torch.", ""), L=L, mode=mode, ms=ms,
                   ns_per_token=ms * 1e6 / (BATCH * L), floor_ms=floor_ms,
                   ratio=ms / floor_ms if impl == "triton" else None,
                   peak_extra_MB=None if peak is None else peak / 2**20, note=note)
        results["rows"].append(row)
        log(f"{impl:10s} {row['dtype']:8s} L={L:8d} {mode:7s} {ms:10.3f} ms "
            f"{row['ns_per_token']:9.2f} ns/tok  floor {floor_ms:8.3f} ms"
            + (f"  x{row['ratio']:.2f}" if row["ratio"] else "")
            + (f"  peak+{row['peak_extra_MB']:.0f} MB" if peak is not None else "") + f" {note}")
        (out_dir / "scan_results.json").write_text(json.dumps(results, indent=1))

    def triton_at(L, dtype, with_grad):
        """Time forward (and forward+backward); returns False once fwd+bwd no longer fits."""
        try:
            inp = make_inputs(L, dtype, grad=with_grad)
        except torch.OutOfMemoryError:
            log(f"triton {dtype} L={L}: inputs do not fit")
            return False
        try:
            f = triton_fwd(inp)
            _, peak = peak_extra(f)
            record("triton", dtype, L, "fwd", bench(f), peak)
        except torch.OutOfMemoryError:
            log(f"triton {dtype} L={L} fwd: out of memory")
        if not with_grad:
            return False
        try:
            call = lambda: selective_scan(**inp, delta_softplus=True, backend="triton")  # noqa: E731
            f = fwd_bwd(call, inp)
            _, peak = peak_extra(f)
            n_dblocks = DIM // st._block_d(DIM, 1, st.BWD_CONFIG["BLOCK_D"])
            partial = 2 * BATCH * n_dblocks * N * L * 4
            atomic = st.BWD_ATOMIC_BC is True or (
                st.BWD_ATOMIC_BC == "auto" and partial > st.PARTIAL_MEMORY_FRACTION
                * torch.cuda.get_device_properties(0).total_memory)
            record("triton", dtype, L, "fwd+bwd", bench(f), peak,
                   note="dB/dC atomics" if atomic else f"dB/dC partials {partial / 2**30:.1f} GiB")
        except torch.OutOfMemoryError:
            log(f"triton {dtype} L={L} fwd+bwd: out of memory")
            return False
        return True

    Ls = [1 << k for k in range(10, 19, 2)]  # 1k, 4k, 16k, 64k, 256k
    for dtype in (torch.bfloat16, torch.float32):
        with_grad = True
        for L in Ls + [1 << 20]:
            with_grad = triton_at(L, dtype, with_grad and L < (1 << 20))
            torch.cuda.empty_cache()

    save()
    # --- the alternatives, bf16 inputs
    dtype = torch.bfloat16
    inp = make_inputs(1024, dtype, grad=True)
    call = lambda: scan_ref.selective_scan_ref(**inp, delta_softplus=True)  # noqa: E731
    with torch.no_grad():
        record("sequential", dtype, 1024, "fwd", bench(call, rep_ms=300, warmup_ms=100))
    record("sequential", dtype, 1024, "fwd+bwd", bench(fwd_bwd(call, inp), rep_ms=300,
                                                       warmup_ms=100))
    del inp
    for L in (1024, 4096, 16384):
        inp = make_inputs(L, dtype, grad=True)
        call = lambda inp=inp: selective_scan_torch(**inp, delta_softplus=True)[0]  # noqa: E731
        with torch.no_grad():
            _, peak = peak_extra(call)
            record("torch", dtype, L, "fwd", bench(call), peak)
        f = fwd_bwd(call, inp)
        _, peak = peak_extra(f)
        record("torch", dtype, L, "fwd+bwd", bench(f), peak)
        del inp
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for L in (1024, 4096, 16384, 65536):
        q, k, v = sdpa_inputs(L, grad=True)
        call = lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True)  # noqa: E731
        with torch.no_grad():
            record("sdpa", dtype, L, "fwd", bench(call, rep_ms=300))
        dout = torch.randn_like(q)

        def f(q=q, k=k, v=v, dout=dout):
            for t in (q, k, v):
                t.grad = None
            sdpa(q, k, v, is_causal=True).backward(dout)
        record("sdpa", dtype, L, "fwd+bwd", bench(f, rep_ms=300))
        del q, k, v, dout
        torch.cuda.empty_cache()

    save()
    if args.compile and time.time() - t_start < args.budget_s:
        run = compiled_chunk_path()
        for L in (1024, 4096):  # autograd through the compiled chunks keeps every chunk's tensors
            inp = make_inputs(L, dtype, grad=True)
            call = lambda inp=inp: run(**inp)  # noqa: E731
            try:
                t0 = time.time()
                f = fwd_bwd(call, inp)
                f()
                log(f"torch.compile warm-up (compile) {time.time() - t0:.1f} s")
                record("compiled", dtype, L, "fwd", bench(call))
                record("compiled", dtype, L, "fwd+bwd", bench(f))
            except Exception as e:
                log(f"compiled L={L} failed: {type(e).__name__}: {str(e)[:200]}")
            del inp
    print(save())


def markdown_table(results):
    rows = results["rows"]
    head = ("| impl | dtype | L | mode | time (ms) | ns/token | floor (ms) | ×floor | "
            "peak extra (MB) | note |\n|---|---|---:|---|---:|---:|---:|---:|---:|---|\n")
    body = ""
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else ""
        peak = f"{r['peak_extra_MB']:.0f}" if r["peak_extra_MB"] is not None else ""
        body += (f"| {r['impl']} | {r['dtype']} | {r['L']} | {r['mode']} | {r['ms']:.3f} | "
                 f"{r['ns_per_token']:.2f} | {r['floor_ms']:.3f} | {ratio} | {peak} | "
                 f"{r.get('note', '')} |\n")
    return head + body


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in results["rows"]:
        series.setdefault((r["impl"], r["dtype"], r["mode"]), []).append(
            (r["L"], r["ns_per_token"]))
    colours = {("triton", "bfloat16"): "C0", ("triton", "float32"): "C9",
               ("sdpa", "bfloat16"): "C3", ("torch", "bfloat16"): "C2",
               ("compiled", "bfloat16"): "C1", ("sequential", "bfloat16"): "C7"}
    for (impl, dtype, mode), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if mode == "fwd" else "s",
                color=colours.get((impl, dtype)), linestyle="-" if mode == "fwd" else "--",
                label=f"{impl} {dtype} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("ns per token (batch 8, width 1024)")
    m = results["meta"]
    ax.set_title(f"selective scan, N={m['N']}, {m['device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


# --------------------------------------------------------------------------------------------
# CPU: the small-Mamba training shape
# --------------------------------------------------------------------------------------------


def cpu_benchmark(args):
    batch, dim, n, L = 32, 128, 16, 256  # d_model 64 × expand 2, N 16
    # decaying states and adjoints reach subnormal floats, which x86 handles ~10x slower
    torch.set_flush_denormal(args.flush_denormal)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU threads={torch.get_num_threads()} batch={batch} dim={dim} N={n} L={L} "
          f"flush_denormal={args.flush_denormal}")
    inp = make_inputs(L, torch.float32, device="cpu", batch=batch, dim=dim, n=n, grad=True)

    def timed(fn, reps):
        """Best of reps, in ms: wall time and this process's CPU time (all threads). On a shared
        machine the CPU time is the steadier of the two."""
        fn()
        best_wall = best_cpu = float("inf")
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            fn()
            best_wall = min(best_wall, time.perf_counter() - t)
            best_cpu = min(best_cpu, time.process_time() - c)
        return best_wall * 1e3, best_cpu * 1e3

    def fb(call):
        def f():
            for t in inp.values():
                t.grad = None
            call().float().square().mean().backward()
        return f

    rows = []
    ref = lambda: scan_ref.selective_scan_ref(**inp, delta_softplus=True)  # noqa: E731
    t_ref = timed(fb(ref), args.reps)
    rows.append(("sequential reference", "", t_ref))
    for inner in ("doubling", "loop", "step"):
        for chunk in (16, 64):
            call = lambda c=chunk, i=inner: selective_scan_torch(  # noqa: E731
                **inp, delta_softplus=True, chunk=c, inner=i)[0]
            rows.append((f"torch path {inner}", chunk, timed(fb(call), args.reps)))
    print("| implementation | chunk | fwd+bwd wall (ms) | fwd+bwd CPU time (ms) | "
          "CPU time vs sequential |\n|---|---:|---:|---:|---:|")
    for name, chunk, (wall, cpu) in rows:
        print(f"| {name} | {chunk} | {wall:.0f} | {cpu:.0f} | {t_ref[1] / cpu:.2f}× |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="run pytest -m gpu tests/ssm first")
    p.add_argument("--sweep", action="store_true", help="time launch shapes, keep the fastest")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--cpu", action="store_true", help="CPU timing of the small-Mamba shape")
    p.add_argument("--replot", metavar="JSON", help="redraw table and plot from a results file")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0: default)")
    p.add_argument("--keep-denormals", dest="flush_denormal", action="store_false",
                   help="CPU: do not flush subnormal floats to zero")
    p.add_argument("--budget-s", type=float, default=400,
                   help="skip torch.compile when this many seconds have passed")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    if args.cpu:
        cpu_benchmark(args)
        return
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        plot(results, Path(args.out) / "scan_ns_per_token.png")
        print(markdown_table(results))
        return
    if args.check:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-x",
                              "-p", "no:cacheprovider", "tests/ssm"], cwd=ROOT)
        if rc != 0:
            sys.exit(f"GPU correctness checks failed (pytest exit {rc}); no benchmark")
    gpu_benchmark(args)


if __name__ == "__main__":
    main()
