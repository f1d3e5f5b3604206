# 2026-12-03/04 host-path work on GPU scoring (issue 10): the scripts the device calls ran,
# carried in an ignored .devdata/ and run from the repository root as 'bash .devdata/<name>.sh'
# (carry: .whl, .devdata, and .whl-dyn with a py-spy 0.4.3 wheel for diag.sh/run5.sh). Each
# script is given whole below, in the state of its last run; iso3.py was iso.py with the
# Parquet-decoding variants cut (one iter_batches line, no read_row_group, no polars scan)
# and StreamReader threads (0, 4, 8), made by a text edit, so it is not repeated here.
# host.py gained the SWITCH variable (run4.sh) and the 'flagged' line after its first runs.

# ===== .devdata/gen.py
import sys, time
sys.path.insert(0, "benchmarks")
from pathlib import Path
import scoring as B
t = time.perf_counter()
B.generate(Path(sys.argv[1]), int(float(sys.argv[2])), device="cuda")
print("generated", sys.argv[1], f"{time.perf_counter()-t:.1f}s", flush=True)

# ===== .devdata/host.py
"""Device diagnostic: score_file of one Parquet file on cuda with the identity or the mamba model."""
import sys, time, os
from pathlib import Path
sys.path.insert(0, "benchmarks")
import numpy as np
if os.environ.get("SWITCH"): sys.setswitchinterval(float(os.environ["SWITCH"]))
import scoring as B
from tsssm.bundle import load_bundle
from tsssm.data.io import ReadSpec
from tsssm.scoring.files import score_file
from tsssm.scoring.scorer import Scorer
path, model, score, contrib = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
import os; DEV = os.environ.get("DEV", "cuda")
threads = int(sys.argv[5]) if len(sys.argv) > 5 else None
folder = Path("/tmp/bundles"); folder.mkdir(exist_ok=True)
bundle = B.make_bundle("mamba", folder, DEV, score)
scorer = Scorer(load_bundle(bundle), device=DEV)
if model == "identity":
    scorer.model = B.Identity()
scorer.update_many(np.zeros((4096 if DEV == "cpu" else 1 << 20, 8), np.float32)); scorer.reset()
spec = ReadSpec(time_column="ts", channels=tuple(scorer.channels))
out = Path("/tmp/out.parquet")
t = time.perf_counter(); c = time.process_time()
res = score_file(path, scorer, spec, out, batch_rows=1 << 20, progress=False, contributions=contrib,
                 read_threads=threads)
dt = time.perf_counter() - t
print("flagged", res.flagged, "intervals", res.intervals); print(f"HOST switch={sys.getswitchinterval()} {model} {score} contrib={contrib} threads={threads}: {res.rows} rows {dt:.2f}s "
      f"{res.rows/dt:.3e} rows/s cpu {time.process_time()-c:.1f}s", flush=True)

# ===== .devdata/iso.py
"""Device diagnostic: each host stage of file-to-file scoring alone (warm page cache)."""
import sys, time, os
from pathlib import Path
sys.path.insert(0, "benchmarks")
import numpy as np
import pyarrow.parquet as pq
import polars as pl
DEV = os.environ.get("DEV", "cuda")
P = Path(sys.argv[1]); N = pq.ParquetFile(P).metadata.num_rows
cols = ["ts"] + [f"c{i}" for i in range(8)]
def rate(label, fn, reps=3):
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    print(f"| {label} | {best*1e3/ (N / (1<<20)):.1f} ms/batch | {N/best:.3e} rows/s |", flush=True)
def pa_read(pre, buf, thr):
    def f():
        kw = dict(pre_buffer=pre) | (dict(buffer_size=buf) if buf else {})
        for b in pq.ParquetFile(P, **kw).iter_batches(batch_size=1 << 20, columns=cols, use_threads=thr):
            pass
    return f
for pre, buf, thr in [(False, 1 << 20, True), (False, 1 << 20, False), (True, 0, True), (True, 0, False), (False, 8 << 20, True)]:
    rate(f"pyarrow iter_batches pre_buffer={pre} buffer={buf} threads={thr}", pa_read(pre, buf, thr))
def rg():
    f = pq.ParquetFile(P)
    for i in range(f.num_row_groups): f.read_row_group(i, columns=cols)
rate("pyarrow read_row_group", rg)
def rg_pl():
    f = pq.ParquetFile(P)
    for i in range(f.num_row_groups): pl.from_arrow(f.read_row_group(i, columns=cols))
rate("pyarrow read_row_group + pl.from_arrow", rg_pl)
if hasattr(pl.LazyFrame, "collect_batches"):
    rate("polars scan collect_batches", lambda: [None for _ in pl.scan_parquet(P).collect_batches(chunk_size=1 << 20)])
from tsssm.data.io import ReadSpec
from tsssm.scoring.reader import StreamReader
spec = ReadSpec(time_column="ts", channels=tuple(cols[1:]))
for th in (0, 2, 4, 8):
    rate(f"StreamReader threads={th}", lambda: [None for _ in StreamReader(P, spec, batch_rows=1 << 20, threads=th)])
batches = list(StreamReader(P, spec, batch_rows=1 << 20, threads=4))
from tsssm.scoring.files import ScoresSink, scores_table
from tsssm.scoring.scorer import ScoredRows, Scorer
rng = np.random.default_rng(0)
scores = [rng.standard_normal(len(b.time)).astype(np.float32) for b in batches]
contribs = [rng.random((len(b.time), 8), dtype=np.float32) for b in batches]
def sink(contrib, intervals):
    def f():
        s = ScoresSink("s", "/tmp/o.parquet", list(cols[1:]), intervals); start = 0
        for b, sc, c in zip(batches, scores, contribs):
            s.add(b); s.write(ScoredRows(start, sc, sc > 2.33, contrib=c if contrib else None)); start += len(sc)
        s.close()
    return f
for c, i in [(False, False), (False, True), (True, True)]:
    rate(f"sink contrib={c} intervals={i} (writer thread)", sink(c, i))
def tables(contrib):
    def f():
        start = 0
        for b, sc, c in zip(batches, scores, contribs):
            scores_table("s", b.time, ScoredRows(start, sc, sc > 2.33, contrib=c if contrib else None), None, list(cols[1:])); start += len(sc)
    return f
rate("scores_table only", tables(False)); rate("scores_table only +contrib", tables(True))
import pyarrow as pa
from tsssm.scoring.files import write_options
tabs = [scores_table("s", b.time, ScoredRows(0, sc, sc > 2.33), None, list(cols[1:])) for b, sc in zip(batches, scores)]
def w(opts):
    def f():
        with pq.ParquetWriter("/tmp/w.parquet", tabs[0].schema, **opts) as wr:
            for t in tabs: wr.write_table(t, row_group_size=1 << 20)
    return f
rate("ParquetWriter one-step tables, our options", w(write_options(list(cols[1:]))))
rate("ParquetWriter, no compression, our encodings", w({**write_options(list(cols[1:])), "compression": "none"}))
rate("ParquetWriter, plain defaults", w({}))
rate("ParquetWriter, no compression, no dictionary, no stats", w({"compression": "none", "use_dictionary": False, "write_statistics": False}))
from tsssm.bundle import load_bundle
import scoring as B
folder = Path("/tmp/bundles"); folder.mkdir(exist_ok=True)
for score in ("one-step", "anomaly"):
    scorer = Scorer(load_bundle(B.make_bundle("mamba", folder, DEV, score)), device=DEV)
    scorer.model = B.Identity(); scorer.contributions = score != "one-step"
    scorer.update_many(batches[0].values); scorer.reset()
    def sub():
        scorer.reset(); q = []
        for b in batches:
            q.append(scorer.submit(b.values))
            if len(q) > 1: q.pop(0).result()
        for p in q: p.result()
    rate(f"identity submit+collect ({score})", sub)
    def upd():
        scorer.reset()
        for b in batches: scorer.update_many(b.values)
    rate(f"identity update_many ({score})", upd)

# ===== .devdata/iso2.py
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

# ===== .devdata/summ.py
import collections, sys
for f in sys.argv[1:]:
    byth = collections.Counter(); busy = collections.Counter(); leaf = collections.Counter()
    for line in open(f):
        stack, n = line.rsplit(" ", 1); n = int(n); fr = stack.split(";")
        th = fr[0].split(":")[-1].strip() if ":" in fr[0] else fr[0]
        byth[th] += n
        if "wait (threading" not in fr[-1] and "acquire" not in fr[-1] and "synchronize" not in fr[-1]:
            busy[th] += n; leaf[(th, fr[-1][:100])] += n
    print("==", f); print("samples", dict(byth)); print("busy", dict(busy))
    for k, v in leaf.most_common(30): print(v, k)

# ===== .devdata/diag.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-dyn/*.whl || exit 1
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, pyarrow, polars, numpy; print(torch.__version__, pyarrow.__version__, polars.__version__, numpy.__version__)"
F=/tmp/s2e7.parquet
python3 .devdata/gen.py $F 2e7
python3 benchmarks/scoring_stages.py $F --threads 4 2>&1 | tail -9
python3 .devdata/host.py $F identity one-step 0 4
python3 .devdata/host.py $F mamba one-step 0 4
for spec in "identity one-step 0" "mamba one-step 0" "identity anomaly 1"; do
  tag=$(echo $spec | tr ' ' '_')
  timeout 120 py-spy record -r 250 -f raw --threads -o $OUT/$tag.txt -- python3 .devdata/host.py $F $spec 4 2>&1 | grep -v "^py-spy>" | tail -3
done
python3 .devdata/summ.py $OUT/*.txt
date -u

# ===== .devdata/iso.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1
date -u; python3 -c "import os; print('cores', len(os.sched_getaffinity(0)), os.cpu_count())"; df -h /tmp | tail -1; free -g | head -2
F=/tmp/s2e7.parquet
[ -f $F ] || OMP_NUM_THREADS=1 python3 .devdata/gen.py $F 2e7
OMP_NUM_THREADS=1 python3 .devdata/iso.py $F
python3 -c "import pyarrow as pa; print('arrow cpu_count', pa.cpu_count(), 'io', pa.io_thread_count())"
date -u

# ===== .devdata/iso2.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
python3 .devdata/iso2.py $F
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 python3 .devdata/iso2.py $F 2>&1 | head -4
ARROW_DEFAULT_MEMORY_POOL=system MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 python3 .devdata/iso2.py $F 2>&1 | head -6

# ===== .devdata/run3.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
python3 .devdata/iso3.py $F
for spec in "identity one-step 0" "mamba one-step 0" "identity one-step 0" "mamba one-step 0" "identity anomaly 1" "mamba anomaly 1"; do python3 .devdata/host.py $F $spec; done

# ===== .devdata/run4.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
for m in identity mamba; do for sw in "" 0.001 0.0002; do SWITCH=$sw python3 .devdata/host.py $F $m one-step 0; done; done
SWITCH=0.001 python3 .devdata/host.py $F identity one-step 0 2
SWITCH=0.001 python3 .devdata/host.py $F identity one-step 0 8
SWITCH=0.001 python3 .devdata/host.py $F mamba anomaly 1

# ===== .devdata/run5.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-dyn/*.whl || exit 1
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
py-spy record --gil --nonblocking -r 500 -f raw --threads -o $OUT/gil_identity.txt -- python3 .devdata/host.py $F identity one-step 0 2>&1 | grep HOST
py-spy record --nonblocking -r 500 -f raw --threads -o $OUT/all_identity.txt -- python3 .devdata/host.py $F identity one-step 0 2>&1 | grep HOST
py-spy record --gil --nonblocking -r 500 -f raw --threads -o $OUT/gil_mamba.txt -- python3 .devdata/host.py $F mamba one-step 0 2>&1 | grep HOST

# ===== .devdata/final.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TSSSM_COMMIT=5a04ade
date -u
timeout 150 python3 -m pytest -q -m gpu tests/scoring tests/ssm/test_segmented.py tests/models -p no:cacheprovider 2>&1 | tail -3
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
for spec in "identity one-step 0" "mamba one-step 0" "mamba anomaly 1"; do python3 .devdata/host.py $F $spec | grep HOST; done
date -u
timeout 330 python3 benchmarks/scoring.py --device cuda --sizes mamba=1e8 --scores one-step anomaly+contrib --stages mamba --read-threads 4 --child-timeout 45 --gen-device cuda --fleet 0 --live 0 --repeats 1 --out $OUT/scoring.json 2>&1 | tail -25
date -u
