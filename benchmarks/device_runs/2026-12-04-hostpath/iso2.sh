python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
F=/tmp/s2e7.parquet
[ -f $F ] || python3 .devdata/gen.py $F 2e7
python3 .devdata/iso2.py $F
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 python3 .devdata/iso2.py $F 2>&1 | head -4
ARROW_DEFAULT_MEMORY_POOL=system MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 python3 .devdata/iso2.py $F 2>&1 | head -6
