#!/usr/bin/env bash
# The GPU runs of issue 5 as one prepared script for a lent GPU machine (the `device` tool):
# build the CUDA extension, run the GPU tests and the benchmarks, and leave every log and
# result file under $OUT, which the tool brings back. Stages, each with its own time limit,
# so that a call stays inside the tool's 10-minute limit and a killed call still returns what
# it wrote. A task gets 15 minutes of device time in all, machine start included, so the
# calls are planned to fit it, most valuable first (a warm machine keeps the build):
#
#   bash benchmarks/gpu_session.sh build test-gpu eig   # call 1: about 9 minutes at most
#   bash benchmarks/gpu_session.sh hvp sparse           # call 2: about 3.5 minutes at most
#   bash benchmarks/gpu_session.sh test prune           # only if time is left
#   bash benchmarks/gpu_session.sh conv2                # issue 4's Conv-2 protocol, resumable
#
# (On a fresh machine every call starts with `build`.) Prepare once on the CPU machine:
# `make gpu-carry` writes .gpu_carry/ (git-ignored): Fashion-MNIST's IDX files and the peers'
# wheels (PyHessian, hessian-eigenthings, curvlinops and einconv: the GPU image lacks them;
# it has numpy, scipy, matplotlib, tqdm, pytest, einops and linear-operator). Name
# `.gpu_carry` in the tool's `carry`.
#
# Stages:
#   build     pip install --no-build-isolation --no-deps -e . (CUDA extension where nvcc and
#             torch agree), env report; peers installed from .gpu_carry/wheels into
#             /tmp/imc_site. 240 s at most.
#   test-gpu  the tests that need the GPU (marker `gpu`, or a `cuda` parameter), 200 s.
#   test      the whole suite (no -x: every failure is listed), 420 s.
#   eig       eig.py, k = 10 and 32, ours against PyHessian and hessian-eigenthings, with the
#             time split of ours (the orthogonalization-share target), 150 s.
#   hvp       hvp.py, every model, engine and block size, 120 s.
#   sparse    sparse.py (4096 x 4096, 80/90/95 % block sparsity, 2:4, the optimizer), 90 s.
#   prune     prune.py --quick, 120 s.
#   bench     eig hvp sparse prune.
#   conv2     prune.py's full protocol on Conv-2 (10 epochs, 3 seeds, every method and
#             target: 174 training runs, ~60 core-hours on the 2-core CPU machine) with
#             $CONV2_WORKERS worker processes (default 8) sharing the GPU, 540 s. Runs
#             finish into .conv2_runs/ (kept while the machine stays warm) and are copied to
#             $OUT/results/conv2/ after the stage: put that folder's runs.jsonl into
#             .gpu_carry/conv2/ and a later call on a fresh machine resumes from it.
# Results go to $OUT/results/, to be committed under benchmarks/results/ with the device named.
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
    MAX_JOBS=${MAX_JOBS:-16} run build 240 "$PYTHON" -m pip install --no-build-isolation \
      --no-deps -v -e .
    if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
      run peers 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/imc_site "$CARRY"/wheels/*.whl
      export PYTHONPATH=/tmp/imc_site${PYTHONPATH:+:$PYTHONPATH}
    else
      log "no peer wheels in $CARRY/wheels: the benchmarks report the peers unavailable"
    fi
  fi
  run env_report 60 "$PYTHON" -m imc_kernels.env_report
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
}

# tests NAME LIMIT PYTEST_ARGS...: a pytest run, its log in $OUT/NAME.log.
tests() {
  local name=$1 limit=$2
  shift 2
  local args=(-q -rs -p no:cacheprovider "$@")
  if [ "$DRY" = 1 ]; then
    args+=(tests/build/test_gemm.py)
  fi
  # Inside the repository the source tree shadows the installed package; the tests import the
  # built extension through imc_kernels._ext either way.
  run "$name" "$limit" "$PYTHON" -m pytest "${args[@]}"
  tail -n 3 "$OUT/$name.log" | tee -a "$OUT/session.log"
}

stage_bench() {
  local what=$1 quick=() results="$OUT/results"
  if [ "$DRY" = 1 ]; then
    quick=(--quick)
  fi
  case $what in
  eig)
    # One head-to-head round (ours and the fastest right peer back to back) per k and two
    # bisection runs of a peer's knob: a few seconds on the GPU; more could push the stage
    # past its 150 s, and a stage killed by its limit loses every row (eig.py writes them at
    # the end).
    local ks=10,32 rounds=(--h2h-rounds 1 --max-refine 2)
    if [ "$DRY" = 1 ]; then ks=1 rounds=(); fi
    run eig 150 "$PYTHON" benchmarks/eig.py "${quick[@]}" --ks "$ks" "${rounds[@]}" \
      --methods ours,pyhessian,eigenthings_lanczos --max-run-s 20 --out "$results"
    ;;
  hvp) run hvp 120 "$PYTHON" benchmarks/hvp.py "${quick[@]}" --max-call-s 10 --out "$results" ;;
  sparse) run sparse 90 "$PYTHON" benchmarks/sparse.py "${quick[@]}" --out "$results" ;;
  prune) run prune 120 "$PYTHON" benchmarks/prune.py --quick --out "$results/prune-quick" ;;
  conv2) stage_conv2 "$results" "${quick[@]}" ;;
  esac
  ls -R "$results" >>"$OUT/session.log"
}

# The Conv-2 protocol: resumes from .conv2_runs/ (this machine) or .gpu_carry/conv2/ (carried).
stage_conv2() {
  local results=$1 runs=${CONV2_RUNS:-$ROOT/.conv2_runs} workers=${CONV2_WORKERS:-8} limit=540
  local suffix=""
  shift
  local extra=("$@")
  if [ "$DRY" = 1 ]; then
    workers=2
    limit=240
    suffix=_quick
    extra+=(--methods random,oneshot)
  fi
  # prune.py's folder for this device: <out>/<device>/fashion-mnist_conv2/.
  local key folder
  key=$("$PYTHON" -c 'import torch
from benchmarks import _harness
print(_harness.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")))')
  folder="$runs/$key/fashion-mnist_conv2$suffix"
  if [ ! -f "$folder/runs.jsonl" ] && [ -f "$CARRY/conv2/runs.jsonl" ]; then
    mkdir -p "$folder"
    cp "$CARRY/conv2/runs.jsonl" "$folder/"
    log "conv2: resuming from the carried runs.jsonl ($(wc -l <"$folder/runs.jsonl") runs)"
  fi
  run conv2 "$limit" "$PYTHON" benchmarks/prune.py --models conv2 --workers "$workers" \
    --out "$runs" "${extra[@]}"
  mkdir -p "$results/conv2"
  # Everything but the saved IMP rounds (checkpoints, megabytes each).
  (cd "$runs" && find . -type f ! -name '*.pt' -exec cp --parents {} "$results/conv2/" \;)
  log "conv2: $(wc -l <"$folder/runs.jsonl" 2>/dev/null || echo 0) runs saved in $folder"
}

if [ $# -eq 0 ]; then
  set -- build test-gpu eig
fi
log "gpu_session: stages $*; OUT=$OUT; DRY=$DRY"
for stage in "$@"; do
  case $stage in
  build) stage_build ;;
  test-gpu) tests pytest-gpu 200 -k "cuda or gpu" ;;
  test) tests pytest 420 ;;
  eig | hvp | sparse | prune | conv2) stage_bench "$stage" ;;
  bench) for part in eig hvp sparse prune; do stage_bench "$part"; done ;;
  *)
    log "unknown stage $stage (build, test-gpu, test, eig, hvp, sparse, prune, bench, conv2)"
    exit 2
    ;;
  esac
done
log "gpu_session: done"
