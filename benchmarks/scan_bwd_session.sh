#!/usr/bin/env bash
# The scan-backward GPU session (benchmarks/scan_bwd_session.py): mamba-ssm's CUDA scan built in
# the background from .anchors/mamba_ssm_scan (a copy of ../shared/anchors/mamba_ssm_scan, as in
# gpu_session.sh), then verification, the backward sweep, the table and the kernel profile.
# Everything lands in ONE tarball, $OUT/kern2.tgz, plus $OUT/table.md. From the repo root:
#     BUDGET_S=225 bash benchmarks/scan_bwd_session.sh      (env: OUT, BUDGET_S, MAMBA_JOBS)
set -u
OUT=${OUT:-$PWD/scan_bwd_out}
RES="$OUT/kern2"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
SRC=${MAMBA_SRC:-.anchors/mamba_ssm_scan}
BUILD=${MAMBA_BUILD:-/tmp/mamba_ssm_build}
build_pid=
if [ -f "$SRC/setup.py" ]; then
  rm -rf "$BUILD" && cp -r "$SRC" "$BUILD"
  setsid bash -c 'cd "$1" && MAX_JOBS="$2" python3 setup.py build_ext --inplace > "$3/mamba_build.log" 2>&1;
    echo $? > "$3/mamba_build.rc.tmp" && mv "$3/mamba_build.rc.tmp" "$3/mamba_build.rc"' \
    _ "$BUILD" "${MAMBA_JOBS:-12}" "$RES" &
  build_pid=$!
else
  echo "scan_bwd_session.sh: no $SRC/setup.py: the mamba-ssm column is skipped" >&2
  echo missing > "$RES/mamba_build.rc"
fi
BUDGET_S=${BUDGET_S:-225}
timeout -k 5 "$((${BUDGET_S%.*} + 10))" python3 benchmarks/scan_bwd_session.py --out "$RES" \
  --mamba-build "$BUILD" --budget-s "$BUDGET_S" "$@"
rc=$?
echo "scan_bwd_session.py rc=$rc"
if [ "$rc" != 0 ] && [ -f "$RES/results.json" ]; then
  echo "scan_bwd_session.sh: the tables of what finished:" >&2
  python3 benchmarks/scan_bwd_session.py --out "$RES" --table-only
fi
if [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; then
  echo "scan_bwd_session.sh: the mamba-ssm build was still running; stopped" >&2
  kill -- "-$build_pid" 2>/dev/null
fi
tail -c 20000 "$RES/mamba_build.log" > "$RES/mamba_build_tail.log" 2>/dev/null && rm -f "$RES/mamba_build.log"
cp "$RES/table.md" "$OUT/table.md" 2>/dev/null
tar czf "$OUT/kern2.tgz" -C "$OUT" kern2 && rm -rf "$RES"
ls -l "$OUT"
exit $rc
