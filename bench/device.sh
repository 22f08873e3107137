#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine whose python3 has torch,
# transformers and peft but not DeepSpeed, pydantic or datasets: installs the wheels carried
# in .whl/ (bench/device-wheels.txt lists them and how to fetch them), then runs, each under
# its own timeout so that one stuck part cannot take the others' time:
#   1. bench/gpu.py: the MFU lever table (Full and LoRA of a 1.1B Llama);
#   2. the gpu test tier (pytest -m gpu: a short real fine-tune through `kubetune run`);
#   3. the GPU part of bench/memory_accuracy.py (predicted against measured peak memory).
# Writes their logs and the sections they would append to bench/RESULTS.md under $OUT.
# At most about 8.5 minutes on an H200. From the repository root:
#
#     OUT=/tmp/out bash bench/device.sh            # on the GPU machine
#     PY=.venv/bin/python DRY=1 bash bench/device.sh   # here: the same steps in smoke sizes
set -u
OUT=${OUT:-/tmp/kubetune-bench}
PY=${PY:-python3}
DRY=${DRY:-}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[device.sh +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/device.log"; }

log "commit $(git rev-parse --short HEAD 2>/dev/null || cat bench/.commit 2>/dev/null || echo unknown)"
nvidia-smi -L 2>&1 | tee -a "$OUT/device.log" || true
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    site=${SITE:-/tmp/kubetune-site}
    extra=()
    if [ -n "$DRY" ]; then
        # Here the interpreter may be another Python: check the wheels install for 3.12.
        extra=(--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64)
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${extra[@]}" .whl/*.whl || { log "wheel install failed"; exit 1; }
    log "wheels installed into $site: $(ls "$site" | grep -c dist-info) packages"
    if [ -z "$DRY" ]; then
        export PYTHONPATH="$site:${PYTHONPATH:-}"
    fi
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/device.log"
import datasets, deepspeed, peft, pydantic, torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "transformers", transformers.__version__, "peft", peft.__version__,
      "deepspeed", deepspeed.__version__, "pydantic", pydantic.__version__,
      "datasets", datasets.__version__)
try:
    import liger_kernel  # noqa: F401
    print("liger_kernel importable")
except Exception as exc:  # the lever rows then say so
    print("liger_kernel not importable:", exc)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30)
EOF

start_size=$(wc -c < bench/RESULTS.md)
if [ -n "$DRY" ]; then
    gpu_args=(--smoke --no-record); mem_args=(--smoke --no-record)
else
    gpu_args=(--budget-s "${GPU_BUDGET_S:-170}")
    mem_args=(--gpu-only --budget-s "${MEM_BUDGET_S:-80}")
fi
log "gpu.py"
failed=0
timeout "${GPU_TIMEOUT_S:-240}" "$PY" bench/gpu.py "${gpu_args[@]}" > "$OUT/gpu.log" 2>&1
rc=$?; log "gpu.py exit $rc"; [ "$rc" = 0 ] || failed=1
log "gpu test tier"
# Skipped without CUDA (the DRY run here checks that it collects and skips).
timeout "${TEST_TIMEOUT_S:-200}" "$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -q -rA \
    > "$OUT/gpu-tests.log" 2>&1
rc=$?; log "gpu test tier exit $rc ($(tail -1 "$OUT/gpu-tests.log"))"; [ "$rc" = 0 ] || failed=1
log "memory_accuracy.py"
timeout "${MEM_TIMEOUT_S:-130}" "$PY" bench/memory_accuracy.py "${mem_args[@]}" \
    > "$OUT/memory_accuracy.log" 2>&1
rc=$?; log "memory_accuracy.py exit $rc"; [ "$rc" = 0 ] || failed=1
tail -c +"$((start_size + 1))" bench/RESULTS.md > "$OUT/RESULTS-device.md"
log "done; RESULTS sections: $(wc -l < "$OUT/RESULTS-device.md") lines"
grep -E '^\|' "$OUT/gpu.log" "$OUT/memory_accuracy.log" | cut -c1-400
if [ "$failed" != 0 ]; then
    log "a part failed: its log is under $OUT"
    tail -20 "$OUT"/*.log >&2
fi
exit "$failed"
