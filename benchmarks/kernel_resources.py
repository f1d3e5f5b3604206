"""Registers, spills and shared memory of the selective-scan kernels, compiled offline (no GPU).

Triton compiles for a GPU target without a device present; ``cuobjdump --dump-resource-usage``
(shipped with Triton) then reads the cubin. Registers per thread decide how many programs fit on
an SM (65,536 registers per SM on Hopper), i.e. the latency hiding a launch shape can get, so
this is the first check of a new kernel variant before it costs device time::

    python benchmarks/kernel_resources.py                   # the configured launch shapes
    python benchmarks/kernel_resources.py --sweep           # the shapes the GPU sweep times
    python benchmarks/kernel_resources.py --dtype float32 --json out.json
    python benchmarks/kernel_resources.py --bwd-session     # scan_bwd_session.py's variants

The numbers come from this machine's Triton (the device may run another release; ptxas
decisions can differ slightly between releases).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_TL = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
#: Registers per SM and the most threads per SM on sm_90 (H100/H200).
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048


def compile_offline(fn, types: dict[str, str], consts: dict, options: dict, arch: int = 90):
    """Compile jit function ``fn`` for sm_<arch> with the given argument types, constexpr
    values and launch options (num_warps, maxnreg: what the launcher passes); returns the
    Triton CompiledKernel (its ``asm`` holds ttir ... cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    sig, cexp, attrs = {}, {}, {}
    for i, name in enumerate(params):
        if name in consts:
            sig[name] = "constexpr"
            cexp[(i,)] = consts[name]
        else:
            sig[name] = types[name]
            # what the launch gives: 16-byte aligned tensors and, at the benchmark's shapes
            # (dim 1024, L a multiple of 64), integers divisible by 16, which Triton
            # specialises on; without it the loads are not vectorised and the tiles get
            # another layout (1 element per thread along L, 5 shuffle rounds per scan)
            if types[name].startswith("*") or types[name] == "i32":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, cexp, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))


def resource_usage(kernel) -> dict:
    """{"regs", "stack", "shared", "local"} of a compiled kernel, read from its cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=False)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout + out.stderr)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {(out.stdout + out.stderr)[-300:]}")
    regs, stack, shared, local = (int(g) for g in m.groups())
    return {"regs": regs, "stack": stack, "shared": shared, "local": local}


def occupancy(regs: int, num_warps: int) -> int:
    """Programs per SM that the registers allow (allocation granularity ignored)."""
    threads = 32 * num_warps
    return max(0, min(REGS_PER_SM // (regs * threads), MAX_THREADS_PER_SM // threads))


def scan_kernel_types(dtype: str, kind: str) -> dict[str, str]:
    p = _TL[dtype]
    f32 = "*fp32"
    if kind == "fwd":
        ptrs = dict(u_ptr=p, dt_ptr=p, A_ptr=f32, B_ptr=p, C_ptr=p, D_ptr=f32, z_ptr=p,
                    bias_ptr=f32, h0_ptr=f32, out_ptr=p, hlast_ptr=f32, hsave_ptr=f32)
        ints = ("dim", "L", "n_chunks", "dims_per_group", "n_groups")
    else:
        ptrs = dict(u_ptr=p, dt_ptr=p, A_ptr=f32, B_ptr=p, C_ptr=p, D_ptr=f32, z_ptr=p,
                    bias_ptr=f32, hsave_ptr=f32, dout_ptr=p, dhlast_ptr=f32, du_ptr=p,
                    ddt_ptr=p, dz_ptr=p, dA_ptr=f32, dB_ptr=f32, dC_ptr=f32, dD_ptr=f32,
                    dbias_ptr=f32, dh0_ptr=f32)
        ints = ("dim", "L", "n_chunks", "dims_per_group", "n_groups", "n_dblocks")
    return {**ptrs, **{k: "i32" for k in ints}}


def scan_resources(kind: str, dtype: str, cfg: dict, n: int = 16, atomic: bool = True,
                   sem: str = "relaxed") -> dict:
    """Compile the scan kernel ``kind`` ("fwd" | "bwd") at Mamba's call (z, D, delta_bias,
    softplus, initial state) for launch shape ``cfg`` and return its resource usage."""
    import triton

    from tsssm.ssm import scan_triton as st

    n_pad = triton.next_power_of_2(n)
    common = dict(N=n, N_PAD=n_pad, BLOCK_D=cfg["BLOCK_D"], BLOCK_L=cfg["BLOCK_L"],
                  HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
                  PREFETCH=bool(cfg.get("PREFETCH", 0)), BC_2D=bool(cfg.get("BC_2D", 0)),
                  CARRY_IN_SCAN=bool(cfg.get("CARRY_IN_SCAN", 0)))
    if kind == "fwd":
        consts = dict(common, UNROLL=st._unroll(n, cfg["UNROLL"], st.FWD_MAX_UNROLL),
                      HAS_H0=True, SAVE=True)
        fn = st._scan_fwd_kernel
    else:
        consts = dict(common, UNROLL=st._unroll(n, cfg["UNROLL"], st.BWD_MAX_UNROLL),
                      HAS_DHLAST=False,
                      ATOMIC_BC=atomic, ATOMIC_SEM=sem, REVERSE_VIA_FLIP=False,
                      LOG2_BLOCK_L=cfg["BLOCK_L"].bit_length() - 1,
                      STATE_PREFETCH=bool(cfg.get("STATE_PREFETCH", 0)),
                      ROW_ATOMICS=bool(cfg.get("ROW_ATOMICS", 0)))
        fn = st._scan_bwd_kernel
    k = compile_offline(fn, scan_kernel_types(dtype, kind), consts, st._launch_options(cfg))
    res = resource_usage(k)
    res["programs_per_sm"] = occupancy(res["regs"], cfg["num_warps"])
    res["warps_per_sm"] = res["programs_per_sm"] * cfg["num_warps"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_TL))
    p.add_argument("--sweep", action="store_true", help="the launch shapes of the GPU sweep")
    p.add_argument("--bwd-session", action="store_true",
                   help="the variants of benchmarks/scan_bwd_session.py")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's notice; the default
    import torch
    from scan_configs import BWD_SWEEP, FWD_SWEEP

    from tsssm.ssm import scan_triton as st

    dt = getattr(torch, args.dtype)
    rows = []
    fwd_cfgs = FWD_SWEEP if args.sweep else [st.launch_config("fwd", dt)]
    block_l = st.launch_config("fwd", dt)["BLOCK_L"]  # the backward walks the forward's chunks
    bwd_cfgs = [{"BLOCK_L": block_l, **c} for c in
                (BWD_SWEEP if args.sweep else [st.launch_config("bwd", dt)])]
    if args.bwd_session:  # each training variant's forward and backward (at its chunk length)
        from scan_bwd_session import fwd_variants, train_variants

        fwd_cfgs, bwd_cfgs = [], []
        for v in train_variants().values():
            if v["fwd_train"] not in fwd_cfgs:
                fwd_cfgs.append(v["fwd_train"])
            bwd_cfgs.append({"BLOCK_L": v["fwd_train"]["BLOCK_L"], **v["bwd"]})
        fwd_cfgs += [v["fwd"] for v in fwd_variants().values() if v["fwd"] not in fwd_cfgs]
    for kind, cfgs in (("fwd", fwd_cfgs), ("bwd", bwd_cfgs)):
        for cfg in cfgs:
            try:
                res = scan_resources(kind, args.dtype, cfg)
            except Exception as err:  # noqa: BLE001 - report and go on
                res = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            rows.append({"kind": kind, "dtype": args.dtype, "config": cfg, **res})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
