"""What one training step of the ETT models costs: kernels launched, device syncs, CPU time.

The models are built from the same config as ``tsssm train experiment=ett data=DATA
data.horizon=H model=MODEL`` (7 channels, input 96), the step is the task's: one
``predict_window`` pass (or one_step + forecast for mamba), the one-step NLL over the context,
the horizon MSE + NLL, backward. Rows (``--models``):

- ``mamba``; ``hybrid_residual`` with its Kalman part filtered by ``sequential`` (the recursion
  over the 96 context steps, the old default) and by ``window`` (tsssm.kalman.window, the new
  default); ``hybrid_dssm`` (time-varying noise: always the sequential filter);
  ``kalman-part/hybrid_residual:METHOD``: the Kalman part of the hybrid_residual step alone
  (one-step and horizon moments, forward and backward), the part the method changes.

Columns:

- ``kernels``: ATen ops of one step (forward + backward) that launch work on a device: the
  profiler's leaf ops without views, allocations and scalar reads. The Mamba selective scan is
  replaced by a stand-in of one kernel forward and one backward while counting (on a GPU it is
  the fused Triton kernel; its torch reference here would count its CPU chunk loop instead),
  so the count is what a GPU step launches, up to the scan's own few kernels.
- ``syncs``: reads of a device value by the host (``aten::_local_scalar_dense``) per step.
- ``cpu_s``: wall seconds of a step on this CPU at batch ``--batch`` (the real torch scan),
  median of ``--reps``; the models run in turn A B C A B C ... so that a drifting machine moves
  them alike. ``vs sequential``: the median of the per-round ratios of the sequential
  hybrid_residual's time (of its Kalman part, for the kalman-part rows) to this row's.

On a GPU a step of these small models is bound by launches (the H200 runs of 2026-12-01: mamba
~0.13 s a step with 12 trainings sharing the GPU and 16 cores, hybrid_residual ~0.9 s), so the
``kernels`` ratio is the estimate of the GPU speed-up.

    python benchmarks/hybrid_step.py --batch 32 --reps 5 [--out FILE.json]
    python benchmarks/hybrid_step.py --batch 128 --reps 9 --models \
        kalman-part/hybrid_residual:sequential kalman-part/hybrid_residual:window
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsssm.anomaly.scores import gaussian_nll  # noqa: E402

#: profiler names that launch no device work (views, allocation, host-side reads)
NO_KERNEL = {
    "aten::view", "aten::slice", "aten::select", "aten::expand", "aten::as_strided",
    "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::transpose", "aten::t",
    "aten::mT", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::detach_",
    "aten::split", "aten::unbind", "aten::narrow", "aten::movedim", "aten::diagonal",
    "aten::lift_fresh", "aten::to", "aten::empty", "aten::empty_strided", "aten::resolve_conj",
    "aten::resolve_neg", "aten::_reshape_alias", "aten::reshape", "aten::expand_as",
    "aten::result_type", "aten::empty_like", "aten::view_as", "aten::squeeze_",
    "aten::unsqueeze_", "aten::as_strided_", "aten::set_", "aten::_local_scalar_dense",
    "aten::item", "aten::is_nonzero", "aten::resize_", "aten::mH", "aten::adjoint",
    "aten::conj", "aten::_conj", "aten::contiguous", "aten::flatten", "aten::unflatten",
    "aten::chunk", "aten::split_with_sizes", "aten::scalar_tensor", "aten::new_empty",
    "aten::new_empty_strided",
}


def build(model: str, dataset: str, horizon: int):
    """The net ``tsssm train experiment=ett data=DATASET data.horizon=H model=MODEL`` builds
    (untrained, seed 0), and the Kalman method override of the hybrid_residual rows."""
    from tsssm.bundle import build_net
    from tsssm.cli import compose
    from tsssm.config import to_plain

    name, _, method = model.partition(":")
    overrides = ["experiment=ett", f"data={dataset}", f"data.horizon={horizon}",
                 f"model={name}", "seed=0"]
    if method:
        overrides.append(f"model.net.kalman.method={method}")
    cfg = compose(overrides)
    torch.manual_seed(0)
    net = build_net(to_plain(cfg.model.net), 7)
    return net.train()


def kalman_step_fn(net, y: torch.Tensor, horizon: int):
    """The Kalman part of a hybrid_residual step alone: its one-step moments over the context
    and its horizon moments, forward and backward (what ``model.net.kalman.method`` changes)."""
    context = y[:, :-horizon]

    def step() -> None:
        net.zero_grad(set_to_none=True)
        pred, state = net._kalman_one_step(context, None, None)
        mean, var = net._kalman_forecast(state, horizon)
        (pred.mean.square().mean() + pred.var.log().mean() + mean.square().mean()
         + var.log().mean()).backward()
    return step


def step_fn(net, y: torch.Tensor, horizon: int):
    """One training step of the task (experiment=ett: variance_loss=detached)."""
    context, target = y[:, :-horizon], y[:, -horizon:]

    def step() -> None:
        net.zero_grad(set_to_none=True)
        if hasattr(net, "predict_window"):
            one, fc = net.predict_window(context, horizon)
            loss = gaussian_nll(context, one)
        else:
            one, _ = net.one_step(y)
            loss = gaussian_nll(y, one)
            fc = net.forecast(context, horizon)
        mse = (fc.mean - target).square().mean()
        loss = loss + mse + gaussian_nll(target, fc._replace(mean=fc.mean.detach()))
        loss.backward()
    return step


class _ScanStandIn(torch.autograd.Function):
    """One kernel forward (the output), one backward: what the fused scan launches, roughly."""

    @staticmethod
    def forward(ctx, u, n_state):
        return u * 1.0, u.new_zeros(u.shape[0], u.shape[1], n_state)

    @staticmethod
    def backward(ctx, gy, gstate):
        return gy, None


def _stand_in(u, delta, A, *args, **kwargs):
    y, state = _ScanStandIn.apply(u, A.shape[-1])
    return (y, state) if kwargs.get("return_final_state") else y


def count(step) -> tuple[int, int]:
    """(kernels, syncs) of one step, the selective scan as a stand-in (see the docstring)."""
    from torch.profiler import ProfilerActivity, profile

    import tsssm.models.mamba as mamba_module

    real = mamba_module.selective_scan
    mamba_module.selective_scan = _stand_in
    try:
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        mamba_module.selective_scan = real
    events = prof.events()
    syncs = Counter(e.name for e in events)["aten::_local_scalar_dense"]
    return sum(_kernels(e) for e in events if e.cpu_parent is None), syncs


def _kernels(event) -> int:
    """Kernel-launching ops in an event's tree: an op counts when nothing below it does (a
    matrix product whose only children are allocations is one kernel; a composite op is the
    kernels it calls)."""
    below = sum(_kernels(c) for c in event.cpu_children)
    if below:
        return below
    return int(event.name.startswith("aten::") and event.name not in NO_KERNEL)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mamba", "hybrid_residual:sequential",
                                                    "hybrid_residual:window", "hybrid_dssm"])
    p.add_argument("--dataset", default="ett_m1")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(args.batch, 96 + args.horizon, 7, generator=g)
    nets = {m: build(m.removeprefix("kalman-part/"), args.dataset, args.horizon)
            for m in args.models}
    steps = {m: (kalman_step_fn if m.startswith("kalman-part/") else step_fn)(
        net, y, args.horizon) for m, net in nets.items()}
    counts = {m: count(s) for m, s in steps.items()}
    for s in steps.values():  # warm-up
        s()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.reps):
        for m, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[m].append(time.perf_counter() - t0)
    rows = []
    for m in steps:
        base = times.get(("kalman-part/" if m.startswith("kalman-part/") else "")
                         + "hybrid_residual:sequential")
        ratio = (statistics.median(b / t for b, t in zip(base, times[m]))
                 if base is not None else None)
        rows.append({"model": m, "kernels": counts[m][0], "syncs": counts[m][1],
                     "cpu_s": statistics.median(times[m]), "vs_sequential": ratio})
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{stamp} · {platform.processor() or platform.machine()} · torch {torch.__version__}"
          f" · {args.threads} thread(s) · data={args.dataset} data.horizon={args.horizon} "
          f"batch {args.batch} · {args.reps} rounds")
    print("| model | kernels / step | syncs / step | CPU s / step | vs sequential (CPU) |")
    print("|---|---|---|---|---|")
    for r in rows:
        vs = "" if r["vs_sequential"] is None else f"{r['vs_sequential']:.2f}x"
        print(f"| {r['model']} | {r['kernels']} | {r['syncs']} | {r['cpu_s']:.3f} | {vs} |")
    if args.out:
        args.out.write_text(json.dumps({"date": stamp, "args": vars(args) | {"out": str(args.out)},
                                        "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
