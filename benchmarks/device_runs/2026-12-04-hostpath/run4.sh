python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
for m in identity mamba; do for sw in "" 0.001 0.0002; do SWITCH=$sw python3 .devdata/host.py $F $m one-step 0; done; done
SWITCH=0.001 python3 .devdata/host.py $F identity one-step 0 2
SWITCH=0.001 python3 .devdata/host.py $F identity one-step 0 8
SWITCH=0.001 python3 .devdata/host.py $F mamba anomaly 1
