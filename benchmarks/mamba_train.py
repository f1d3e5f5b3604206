"""Mamba forecaster training throughput: the fused Triton scan vs mamba-ssm's CUDA scan vs the
torch scan path.

Same model, same batches, same loss as `tsssm train model=mamba` (one-step NLL over every
position plus the horizon NLL), AdamW steps timed after a warm-up. Prints a table.

    python benchmarks/mamba_train.py --device cuda --backends triton mamba-ssm torch
    python benchmarks/mamba_train.py --device cpu --backends torch --steps 3 --threads 2

"mamba-ssm" runs the same model with its scan on mamba-ssm's kernels (``selective_scan_cuda``
importable, see benchmarks/peers.py). On the CPU subnormal floats are flushed to zero, as
``tsssm train`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from tsssm.anomaly.scores import gaussian_nll
from tsssm.models.mamba_forecaster import MambaForecaster


def step_fn(model, opt, y, horizon):
    def step():
        opt.zero_grad(set_to_none=True)
        pred, _ = model.one_step(y)
        loss = gaussian_nll(y, pred)
        fpred = model.forecast(y[:, :-horizon], horizon)
        loss = loss + gaussian_nll(y[:, -horizon:], fpred)
        loss.backward()
        opt.step()
        return loss
    return step


def measure(backend: str, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
    scan = {"mamba-ssm": "triton"}.get(backend, backend)
    model = MambaForecaster(n_channels=args.channels, d_model=args.d_model,
                            n_layers=args.layers, d_state=args.d_state, horizon=args.horizon,
                            scan_backend=scan).to(device)
    if backend == "mamba-ssm":
        from peers import patch_mamba_block

        patched = patch_mamba_block()
    else:
        patched = contextlib.nullcontext()
    with patched:
        return _measure(model, backend, args, device)


def _measure(model, backend: str, args, device) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y = torch.randn(args.batch, args.window, args.channels, device=device).cumsum(1) * 0.1
    step = step_fn(model, opt, y, args.horizon)
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    times.sort()
    cpu.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"backend": backend, "window": args.window, "batch": args.batch,
            "ms_per_step": median * 1e3, "samples_per_s": args.batch / median,
            "cpu_ms_per_step": cpu[len(cpu) // 2] * 1e3, "peak_mib": peak,
            "loss": float(loss.detach())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=["triton", "torch"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--window", type=int, default=192)
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--channels", type=int, default=7)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    args = p.parse_args()
    rows = [measure(b, args) for b in args.backends]
    base = rows[0]["samples_per_s"]
    print(f"\nMamba forecaster training, {args.device}, batch {args.batch}, window {args.window}, "
          f"C={args.channels}, d_model={args.d_model}, layers={args.layers}, N={args.d_state}")
    print(f"{'backend':<10} {'ms/step':>9} {'cpu ms':>9} {'samples/s':>10} {'ratio':>7} "
          f"{'peak MiB':>9}")
    for r in rows:
        print(f"{r['backend']:<10} {r['ms_per_step']:>9.2f} {r['cpu_ms_per_step']:>9.1f} "
              f"{r['samples_per_s']:>10.1f} {base / r['samples_per_s']:>7.2f} "
              f"{r['peak_mib']:>9.1f}")


if __name__ == "__main__":
    main()
