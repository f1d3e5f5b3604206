"""Launch shapes of the selective-scan kernels that the GPU sweep times (benchmarks/gpu_session.py)
and that benchmarks/kernel_resources.py compiles offline.

Each is a partial config merged over ``tsssm.ssm.scan_triton.FWD_CONFIG`` / ``BWD_CONFIG``. The
register counts in the comments are Triton 3.9's for sm_90a, bf16 (kernel_resources.py), with the
programs per SM they allow: the forward and backward are latency-bound, so these matter.
"""

from __future__ import annotations

#: Forward: (BLOCK_D, BLOCK_L, num_warps, UNROLL, PREFETCH).
FWD_SWEEP = [
    dict(BLOCK_D=bd, BLOCK_L=bl, num_warps=w, UNROLL=un, PREFETCH=pf)
    for bd, bl, w, un, pf in [
        (16, 64, 4, 4, 0),  # the kernel of 2026-11-22 (H100 sweep): 222 regs, 2 programs/SM
        (16, 64, 4, 4, 1),  # prefetching: 255 regs + 16 B spilled, 2 programs/SM
        (16, 64, 8, 4, 0),  # 128 regs (+24 B spilled), 2 programs of 8 warps/SM
        (16, 64, 8, 4, 1),  # 143 regs, 1 program/SM
        (8, 64, 2, 4, 1),  # 197 regs, 5 programs of 2 warps/SM
        (8, 128, 4, 4, 1),  # 225 regs, 2 programs/SM
    ]
]
#: Backward: (BLOCK_D, num_warps, UNROLL, PREFETCH); BLOCK_L is the training forward's.
BWD_SWEEP = [
    dict(BLOCK_D=bd, num_warps=w, UNROLL=un, PREFETCH=pf)
    for bd, w, un, pf in [
        (4, 1, 2, 0),  # the kernel of 2026-11-22: 255 regs at BLOCK_L 64 (173 at 32)
        (4, 1, 2, 1),
        (4, 1, 1, 0),  # 245 regs
        (8, 2, 2, 0),
        (16, 4, 2, 0),  # 255 regs + 240 B spilled
    ]
]
