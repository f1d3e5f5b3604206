python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
python3 .devdata/iso3.py $F
for spec in "identity one-step 0" "mamba one-step 0" "identity one-step 0" "mamba one-step 0" "identity anomaly 1" "mamba anomaly 1"; do python3 .devdata/host.py $F $spec; done
