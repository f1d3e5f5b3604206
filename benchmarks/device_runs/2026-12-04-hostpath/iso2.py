import sys, time, os, threading
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
P = Path(sys.argv[1]); N = pq.ParquetFile(P).metadata.num_rows; G = pq.ParquetFile(P).num_row_groups
cols = ["ts"] + [f"c{i}" for i in range(8)]
def rate(label, fn, reps=3):
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    print(f"| {label} | {best*1e3/ (N / (1<<20)):.1f} ms/batch | {N/best:.3e} rows/s |", flush=True)
print("pool", pa.default_memory_pool().backend_name, "env", {k: v for k, v in os.environ.items() if "MALLOC" in k or "ARROW" in k})
n = 8 << 20
def fresh():
    for _ in range(19): a = np.empty(n, np.float32); a.fill(1.0)
buf = np.empty(n, np.float32)
def reuse():
    for _ in range(19): buf.fill(1.0)
rate("numpy 32 MB fresh alloc + fill", fresh); rate("numpy 32 MB reused fill", reuse)
def read(pool):
    def f():
        pa.set_memory_pool(pool)
        for b in pq.ParquetFile(P, pre_buffer=False, buffer_size=1 << 20).iter_batches(batch_size=1 << 20, columns=cols, use_threads=True, ):
            pass
    return f
pools = [("default", pa.default_memory_pool()), ("system", pa.system_memory_pool())]
for name in ("mimalloc", "jemalloc"):
    try: pools.append((name, getattr(pa, f"{name}_memory_pool")()))
    except Exception as e: print(name, e)
for name, pool in pools:
    rate(f"iter_batches pool={name}", read(pool))
try:
    pa.jemalloc_set_decay_ms(-1); rate("iter_batches jemalloc decay=-1", read(pa.jemalloc_memory_pool()))
except Exception as e: print("decay", e)
def par(k, pool=None):
    def f():
        if pool is not None: pa.set_memory_pool(pool)
        def work(r):
            pf = pq.ParquetFile(P)
            for g in range(r, G, k): pf.read_row_group(g, columns=cols, use_threads=False)
        ts = [threading.Thread(target=work, args=(r,)) for r in range(k)]
        [t.start() for t in ts]; [t.join() for t in ts]
    return f
for k in (1, 2, 4, 8):
    rate(f"read_row_group on {k} threads (mimalloc/jemalloc default)", par(k, pools[0][1]))
rate("read_row_group on 4 threads (system pool)", par(4, pa.system_memory_pool()))
