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
