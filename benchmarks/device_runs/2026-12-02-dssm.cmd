python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD MLFLOW_ALLOW_FILE_STORE=true OMP_NUM_THREADS=1 TSSSM_COMMIT=@@COMMIT@@
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
# 1. one dataset x horizon alone on the machine: the README's command for the main hybrid, default recipe
TIMEFORMAT="alone wall %R s"; date -u
{ time python3 -m tsssm.cli train experiment=ett data=ett_h1 data.root=.devdata/ett 'data.files=[ETTh1.parquet]' data.horizon=96 model=hybrid_residual trainer=gpu tracking.uri=file:///tmp/alone/mlruns tracking.artifact_root=/tmp/alone/artifacts tracking.output_dir=/tmp/alone trainer.enable_progress_bar=false > $OUT/alone_hybrid_residual_ett_h1_96.log 2>&1 ; } 2> $OUT/alone_time.txt
cat $OUT/alone_time.txt; tail -n 5 $OUT/alone_hybrid_residual_ett_h1_96.log; date -u
# 2. hybrid_dssm (starts as kalman_ett since hyinit) on ETTh1 and ETTh2, 8 trainings sharing the GPU
python3 benchmarks/accuracy.py --suite ett --accelerator gpu --store file --root .devdata/ett --data-format parquet --time-limit 390 --logs /tmp/hl --jobs 8 --datasets ett_h1 ett_h2 --models hybrid_dssm --set trainer.max_epochs=10 trainer.max_time=170 --out $OUT/accuracy.json > $OUT/driver.log 2>&1; echo "driver rc=$?"; date -u
find /tmp/hl /tmp/alone \( -name '*.log' -o -name log.txt -o -path '*/mlruns/*/metrics/*' -o -path '*/mlruns/*/tags/*' \) -type f | tar czf $OUT/logs.tgz -T -; tail -n 30 $OUT/driver.log
