"""The largest sequence length the fused scan's forward handles at batch 8, dim 1024, N 16.

Inputs are drawn in place (``normal_``) so no float32 temporary doubles the memory; the output's
finiteness is checked before timing. Prints time, ns/token and peak memory per (dtype, L).

    python3 benchmarks/scan_long.py
"""

from __future__ import annotations

import torch
import triton

from tsssm.ssm import selective_scan

BATCH, DIM, N = 8, 1024, 16
CASES = ((torch.bfloat16, (1 << 18, 1 << 19, 1 << 20)), (torch.float32, (1 << 19,)))


def measure(dtype: torch.dtype, L: int) -> str:
    def draw(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="cuda", dtype=dtype).normal_()

    u, delta, z = draw(BATCH, DIM, L), draw(BATCH, DIM, L), draw(BATCH, DIM, L)
    B, C = draw(BATCH, N, L), draw(BATCH, N, L)
    A = -torch.rand(DIM, N, device="cuda") - 0.1
    D, bias = torch.randn(DIM, device="cuda"), torch.randn(DIM, device="cuda")

    def fwd() -> torch.Tensor:
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                              delta_softplus=True, backend="triton")

    with torch.no_grad():
        assert torch.isfinite(fwd().float()[:, :, -1000:]).all()
        ms = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
    peak = torch.cuda.max_memory_allocated() / 2**30
    return f"fwd {ms:.2f} ms  {ms * 1e6 / (BATCH * L):.2f} ns/token  peak {peak:.1f} GiB"


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for dtype, lengths in CASES:
        for L in lengths:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                print(f"L={L} {dtype} {measure(dtype, L)}", flush=True)
            except torch.OutOfMemoryError:
                print(f"L={L} {dtype}: out of memory", flush=True)


if __name__ == "__main__":
    main()
