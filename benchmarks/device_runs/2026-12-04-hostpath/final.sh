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
