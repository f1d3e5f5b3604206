# Sourced by the GPU session scripts (gpu_session.sh, scan_bwd_session.sh): mamba-ssm's CUDA scan
# built in the background from .anchors/mamba_ssm_scan (a copy of ../shared/anchors/mamba_ssm_scan)
# while the session's own work runs.
#   mamba_build_start LOGDIR JOBS   -> sets BUILD (the build folder) and build_pid; LOGDIR gets
#                                      mamba_build.log and, when it ends, mamba_build.rc
#   mamba_build_stop LOGDIR NAME    -> stops a build still running, keeps the log's tail
# env: MAMBA_SRC (the sources), MAMBA_BUILD (the build folder)
mamba_build_start() {
  local logdir=$1 jobs=$2 src=${MAMBA_SRC:-.anchors/mamba_ssm_scan}
  BUILD=${MAMBA_BUILD:-/tmp/mamba_ssm_build}
  build_pid=
  if [ -f "$src/setup.py" ]; then
    rm -rf "$BUILD" && cp -r "$src" "$BUILD"
    # its own process group (setsid), so that it can be stopped with all its compilers
    setsid bash -c 'cd "$1" && MAX_JOBS="$2" python3 setup.py build_ext --inplace > "$3/mamba_build.log" 2>&1;
      echo $? > "$3/mamba_build.rc.tmp" && mv "$3/mamba_build.rc.tmp" "$3/mamba_build.rc"' \
      _ "$BUILD" "$jobs" "$logdir" &
    build_pid=$!
  else
    echo "$(basename "$0"): no $src/setup.py: the mamba-ssm column is skipped" >&2
    echo missing > "$logdir/mamba_build.rc"
  fi
}

mamba_build_stop() {
  local logdir=$1
  if [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; then
    echo "$(basename "$0"): the mamba-ssm build was still running; stopped" >&2
    kill -- "-$build_pid" 2>/dev/null
  fi
  tail -c 20000 "$logdir/mamba_build.log" > "$logdir/mamba_build_tail.log" 2>/dev/null \
    && rm -f "$logdir/mamba_build.log"
}
