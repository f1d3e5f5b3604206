# main @@@COMMIT@@: the -m gpu tests of the Triton Kalman kernels (the parallel filter's float64 arithmetic change of stop 18 first verified here), alone in the call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true
echo "@@COMMIT@@ $(date -u +%FT%TZ)" > $OUT/commit.txt; nvidia-smi > $OUT/nvidia_smi.txt 2>&1
timeout 540 python3 -m pytest -q -m gpu -p no:cacheprovider -rA -n 6 --durations=15 tests/kalman/test_parallel_triton.py tests/kalman/test_fused_triton.py tests/kalman/test_fused_grad.py > $OUT/pytest_gpu_kalman.log 2>&1; rc=$?
echo "pytest rc=$rc $(date -u +%T)"; tail -n 40 $OUT/pytest_gpu_kalman.log
