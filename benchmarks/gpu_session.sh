#!/usr/bin/env bash
# The GPU runs of issue 5 as one prepared script for a lent GPU machine (the `device` tool):
# build the CUDA extension, run the whole test suite on the GPU, run the benchmarks, and leave
# every log and result file under $OUT, which the tool brings back. Stages, so that each call
# stays inside the tool's 10-minute limit and a killed call still returns what it wrote:
#
#   bash benchmarks/gpu_session.sh build test     # first call: about 5 minutes
#   bash benchmarks/gpu_session.sh build bench    # second call (a fresh machine rebuilds)
#
# Prepare once on the CPU machine: `make gpu-carry` writes .gpu_carry/ (git-ignored):
# Fashion-MNIST's IDX files and the peers' wheels (PyHessian, hessian-eigenthings, curvlinops
# and einconv: the GPU image lacks them; it has numpy, scipy, matplotlib, tqdm, pytest, einops
# and linear-operator). Name `.gpu_carry` in the tool's `carry`.
#
# Stages:
#   build  pip install --no-build-isolation --no-deps -e . (CUDA extension where nvcc and
#          torch agree), env report; peers installed from .gpu_carry/wheels into /tmp/imc_site.
#   test   the whole suite (pytest -x is not used: every failure is listed), 420 s at most.
#   bench  hvp.py, eig.py (k = 1, 10, 32), sparse.py and prune.py --quick; results in
#          $OUT/results/ to be committed under benchmarks/results/ with the device named.
#
# DRY=1 runs the stages on whatever device is there in --quick form without installing
# (the CPU machine's check of this script: tests/benchmarks/test_gpu_session.py).
set -uo pipefail

OUT=${OUT:-/tmp/imc_gpu_out}
mkdir -p "$OUT/results"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
CARRY=${CARRY:-$ROOT/.gpu_carry}
if [ -d "$CARRY/fashion-mnist" ]; then
  export IMC_DATA="$CARRY"
fi
if [ -d /tmp/imc_site ]; then
  export PYTHONPATH=/tmp/imc_site${PYTHONPATH:+:$PYTHONPATH}
fi
DRY=${DRY:-0}

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

# run NAME LIMIT_S CMD...: one step, its output in $OUT/NAME.log, its status in session.log.
run() {
  local name=$1 limit=$2
  shift 2
  log "start $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  log "end $name: status $status (124 = stopped at ${limit} s)"
  return 0
}

stage_build() {
  if [ "$DRY" = 1 ]; then
    log "DRY=1: no install"
  else
    # Editable: the extension lands in imc_kernels/ beside the sources, which the tests and
    # the benchmarks import from the repository root (a plain install would be shadowed by
    # the source tree there and fall back to a JIT build).
    MAX_JOBS=${MAX_JOBS:-16} run build 420 "$PYTHON" -m pip install --no-build-isolation \
      --no-deps -v -e .
    if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
      run peers 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/imc_site "$CARRY"/wheels/*.whl
      export PYTHONPATH=/tmp/imc_site${PYTHONPATH:+:$PYTHONPATH}
    else
      log "no peer wheels in $CARRY/wheels: the benchmarks report the peers unavailable"
    fi
  fi
  run env_report 120 "$PYTHON" -m imc_kernels.env_report
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
}

stage_test() {
  local args=(-q -rs -p no:cacheprovider)
  if [ "$DRY" = 1 ]; then
    args+=(tests/build/test_gemm.py)
  fi
  # Inside the repository the source tree shadows the installed package; the tests import the
  # built extension through imc_kernels._ext either way.
  run pytest 420 "$PYTHON" -m pytest "${args[@]}"
  tail -n 3 "$OUT/pytest.log" | tee -a "$OUT/session.log"
}

stage_bench() {
  local quick=()
  local eig_ks=1,10,32
  if [ "$DRY" = 1 ]; then
    quick=(--quick)
    eig_ks=1
  fi
  local results="$OUT/results"
  run hvp 240 "$PYTHON" benchmarks/hvp.py "${quick[@]}" --max-call-s 20 --out "$results"
  run eig 300 "$PYTHON" benchmarks/eig.py "${quick[@]}" --ks "$eig_ks" --max-run-s 30 \
    --out "$results"
  run sparse 180 "$PYTHON" benchmarks/sparse.py "${quick[@]}" --out "$results"
  run prune 240 "$PYTHON" benchmarks/prune.py --quick --out "$results/prune-quick"
  ls -R "$results" >>"$OUT/session.log"
}

if [ $# -eq 0 ]; then
  set -- build test
fi
log "gpu_session: stages $*; OUT=$OUT; DRY=$DRY"
for stage in "$@"; do
  case $stage in
  build) stage_build ;;
  test) stage_test ;;
  bench) stage_bench ;;
  *)
    log "unknown stage $stage (build, test, bench)"
    exit 2
    ;;
  esac
done
log "gpu_session: done"
