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
. benchmarks/mamba_build.sh
mamba_build_start "$RES" "${MAMBA_JOBS:-12}"
BUDGET_S=${BUDGET_S:-225}
timeout -k 5 "$((${BUDGET_S%.*} + 10))" python3 benchmarks/scan_bwd_session.py --out "$RES" \
  --mamba-build "$BUILD" --budget-s "$BUDGET_S" "$@"
rc=$?
echo "scan_bwd_session.py rc=$rc"
if [ "$rc" != 0 ] && [ -f "$RES/results.json" ]; then
  echo "scan_bwd_session.sh: the tables of what finished:" >&2
  python3 benchmarks/scan_bwd_session.py --out "$RES" --table-only
fi
mamba_build_stop "$RES"
cp "$RES/table.md" "$OUT/table.md" 2>/dev/null
tar czf "$OUT/kern2.tgz" -C "$OUT" kern2 && rm -rf "$RES"
ls -l "$OUT"
exit $rc
