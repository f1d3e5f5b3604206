"""Where a GPU scoring call's time goes: the Mamba one-step score of one stream in calls of 2^20
rows (benchmarks/scoring.py's untrained default-size model), timed per stage with CUDA
synchronisation, then the CUDA kernels of a few calls under torch.profiler.

    python benchmarks/profile_gpu_scoring.py [--rows 1048576] [--calls 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scoring  # noqa: E402

from tsssm.bundle import load_bundle  # noqa: E402
from tsssm.scoring.scorer import Scorer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--score", default="one-step")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(scoring.make_bundle("mamba", Path(tmp), args.device, args.score))
    scorer = Scorer(bundle, device=args.device)
    if args.device == "cpu":  # a smoke run of the script itself
        torch.cuda.synchronize = lambda: None
        torch.cuda.get_device_name = lambda: "cpu"
    rng = np.random.default_rng(0)
    rows = [(rng.standard_normal((args.rows, scoring.CHANNELS)).cumsum(0) * 0.01
             + rng.standard_normal((args.rows, scoring.CHANNELS))).astype(np.float32)
            for _ in range(2)]
    for i in range(3):
        scorer.update_many(rows[i % 2])
    torch.cuda.synchronize()

    def timed(label, fn, n=args.calls):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / n * 1e3
        print(f"| {label} | {ms:.2f} | {args.rows / ms * 1e3:,.0f} |", flush=True)
        return ms

    print(f"rows per call {args.rows}, score {args.score}, {torch.cuda.get_device_name()}")
    print("| stage (per call) | ms | rows/s |\n|---|---:|---:|")
    timed("Scorer.update_many (host scale + copy + model + scores + back)",
          lambda i: scorer.update_many(rows[i % 2]))
    queue: list = []

    def queued(i):  # score_file's order: the next call queued before the last is collected
        queue.append(scorer.submit(rows[i % 2]))
        if len(queue) > 1:
            queue.pop(0).result()
    timed("Scorer.submit ahead, then collect (score_file's queue of one)", queued)
    while queue:
        queue.pop(0).result()
    torch.cuda.synchronize()
    a = time.perf_counter()
    for i in range(args.calls):
        queue.append(scorer.submit(rows[i % 2]))
    submit_ms = (time.perf_counter() - a) / args.calls * 1e3
    while queue:
        queue.pop(0).result()
    print(f"| host time of Scorer.submit (copy in + enqueue, no wait) | {submit_ms:.2f} | |")
    scorer.reset()
    scorer.update_many(rows[0])
    timed("host: scale into the pinned buffer + async copy",
          lambda i: scorer._scaled_input(rows[i % 2]))
    t = scorer._scaled_input(rows[0])
    model = scorer.model
    state = [scorer._state]

    def model_only(i):
        with torch.no_grad():
            _, state[0] = model.one_step(t, state[0])
    timed("model.one_step alone (input on the GPU)", model_only)

    def launch_only(i):  # the host's time to enqueue the model's kernels
        with torch.no_grad():
            _, state[0] = model.one_step(t, state[0])
    torch.cuda.synchronize()
    a = time.perf_counter()
    for i in range(args.calls):
        launch_only(i)
    enqueue = (time.perf_counter() - a) / args.calls * 1e3
    torch.cuda.synchronize()
    print(f"| host time to enqueue model.one_step (no sync) | {enqueue:.2f} | |")
    timed("model + scores + copy back (Scorer._score_tensor)",
          lambda i: scorer._score_tensor(t))

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            scorer._score_tensor(t)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                    max_name_column_width=70))


if __name__ == "__main__":
    main()
