"""Launch shapes of the selective-scan kernels that the GPU sweep times (benchmarks/scan.py,
benchmarks/gpu_session.py) and that benchmarks/kernel_resources.py compiles offline.

Each is a partial config merged over ``tsssm.ssm.scan_triton.FWD_CONFIG`` / ``BWD_CONFIG``.
"""

from __future__ import annotations

#: Forward: (BLOCK_D, BLOCK_L, num_warps, UNROLL, PREFETCH).
FWD_SWEEP = [
    dict(BLOCK_D=bd, BLOCK_L=bl, num_warps=w, UNROLL=un, PREFETCH=pf)
    for bd, bl, w, un, pf in [
        (16, 64, 4, 4, 0),  # the kernel of 2026-11-22 (H100 sweep)
        (16, 64, 4, 4, 1),
        (16, 64, 4, 2, 1),
        (8, 64, 2, 4, 1),
        (8, 64, 2, 2, 1),
        (16, 32, 2, 4, 1),
        (32, 32, 4, 4, 1),
        (8, 128, 4, 4, 1),
    ]
]
#: Backward: (BLOCK_D, num_warps, UNROLL, PREFETCH); BLOCK_L is the forward's.
BWD_SWEEP = [
    dict(BLOCK_D=bd, num_warps=w, UNROLL=un, PREFETCH=pf)
    for bd, w, un, pf in [
        (4, 1, 2, 0),  # the kernel of 2026-11-22
        (4, 1, 2, 1),
        (4, 1, 1, 0),
        (4, 1, 1, 1),
        (8, 2, 2, 0),
        (8, 1, 1, 0),
        (16, 4, 2, 0),
    ]
]
