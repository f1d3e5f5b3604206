# twins branch @@COMMIT@@: the -m gpu tests of the Triton Kalman files whose set-up moved to
# tests/helpers/triton_cases.py and whose launchers now share fused_triton.param_args /
# exec_generated. Everything lands under $OUT (log, summary.json).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true
echo "@@COMMIT@@ $(date -u +%FT%TZ)" > $OUT/commit.txt; nvidia-smi > $OUT/nvidia_smi.txt 2>&1
timeout 500 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/kalman/test_parallel_triton.py tests/kalman/test_fused_triton.py tests/kalman/test_fused_grad.py > $OUT/pytest_gpu_kalman.log 2>&1; rc=$?
python3 -c "import json,sys; t=open(sys.argv[1]).read().strip().splitlines(); json.dump({'commit': '@@COMMIT@@', 'rc': int(sys.argv[2]), 'summary': t[-1] if t else ''}, open(sys.argv[3], 'w'))" $OUT/pytest_gpu_kalman.log $rc $OUT/summary.json
