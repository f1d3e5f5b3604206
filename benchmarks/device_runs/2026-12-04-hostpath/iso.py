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
