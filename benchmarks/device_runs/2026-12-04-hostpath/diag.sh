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
