#!/usr/bin/env bash
# One GPU session (see benchmarks/gpu_session.py): mamba-ssm's CUDA scan built in the background
# from .anchors/mamba_ssm_scan (a copy of ../shared/anchors/mamba_ssm_scan), the kernels' GPU
# tests, then every timing side by side; results under $OUT. From the repository root:
#     bash benchmarks/gpu_session.sh            (env: OUT, BUDGET_S, MAMBA_SRC, MAMBA_JOBS)
set -u
OUT=${OUT:-$PWD/gpu_session_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
. benchmarks/mamba_build.sh
# half the cores: the Triton compiles of the session need the rest
mamba_build_start "$OUT" "${MAMBA_JOBS:-8}"
BUDGET_S=${BUDGET_S:-460}
# a section that overruns the budget is stopped 35 s after it; the results of every finished
# section are already in session_results.json, and the table is then made from them
timeout -k 5 "$((${BUDGET_S%.*} + 35))" python3 benchmarks/gpu_session.py --out "$OUT" \
  --mamba-build "$BUILD" --budget-s "$BUDGET_S" "$@"
rc=$?
if [ "$rc" != 0 ] && [ -f "$OUT/session_results.json" ]; then
  echo "gpu_session.sh: gpu_session.py exited with $rc; the table of what finished:" >&2
  python3 benchmarks/gpu_session.py --out "$OUT" --table-only
fi
mamba_build_stop "$OUT"
exit $rc
