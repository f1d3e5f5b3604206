import sys, time
sys.path.insert(0, "benchmarks")
from pathlib import Path
import scoring as B
t = time.perf_counter()
B.generate(Path(sys.argv[1]), int(float(sys.argv[2])), device="cuda")
print("generated", sys.argv[1], f"{time.perf_counter()-t:.1f}s", flush=True)
