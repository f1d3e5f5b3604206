python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1
date -u; python3 -c "import os; print('cores', len(os.sched_getaffinity(0)), os.cpu_count())"; df -h /tmp | tail -1; free -g | head -2
F=/tmp/s2e7.parquet
[ -f $F ] || OMP_NUM_THREADS=1 python3 .devdata/gen.py $F 2e7
OMP_NUM_THREADS=1 python3 .devdata/iso.py $F
python3 -c "import pyarrow as pa; print('arrow cpu_count', pa.cpu_count(), 'io', pa.io_thread_count())"
date -u
