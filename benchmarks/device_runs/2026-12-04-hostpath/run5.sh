python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-dyn/*.whl || exit 1
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
py-spy record --gil --nonblocking -r 500 -f raw --threads -o $OUT/gil_identity.txt -- python3 .devdata/host.py $F identity one-step 0 2>&1 | grep HOST
py-spy record --nonblocking -r 500 -f raw --threads -o $OUT/all_identity.txt -- python3 .devdata/host.py $F identity one-step 0 2>&1 | grep HOST
py-spy record --gil --nonblocking -r 500 -f raw --threads -o $OUT/gil_mamba.txt -- python3 .devdata/host.py $F mamba one-step 0 2>&1 | grep HOST
