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
SRC=${MAMBA_SRC:-.anchors/mamba_ssm_scan}
BUILD=${MAMBA_BUILD:-/tmp/mamba_ssm_build}
build_pid=
if [ -f "$SRC/setup.py" ]; then
  rm -rf "$BUILD" && cp -r "$SRC" "$BUILD"
  # half the cores: the Triton compiles of the session need the rest
  # its own process group (setsid), so that it can be stopped with all its compilers
  setsid bash -c 'cd "$1" && MAX_JOBS="$2" python3 setup.py build_ext --inplace > "$3/mamba_build.log" 2>&1;
    echo $? > "$3/mamba_build.rc.tmp" && mv "$3/mamba_build.rc.tmp" "$3/mamba_build.rc"' \
    _ "$BUILD" "${MAMBA_JOBS:-8}" "$OUT" &
  build_pid=$!
else
  echo "gpu_session.sh: no $SRC/setup.py: the mamba-ssm column is skipped" >&2
  echo missing > "$OUT/mamba_build.rc"
fi
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
if [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; then
  echo "gpu_session.sh: the mamba-ssm build was still running; stopped" >&2
  kill -- "-$build_pid" 2>/dev/null
fi
tail -c 20000 "$OUT/mamba_build.log" > "$OUT/mamba_build_tail.log" 2>/dev/null && rm -f "$OUT/mamba_build.log"
exit $rc
