#!/usr/bin/env bash
# The 10-minute GPU check: one H100 / H200 with torch 2.11, triton 3.6 and Python 3.12, nothing to install.
#
#     bash bench/gpu_check.sh [--out FILE] [--dry-run]
#
# Runs the decisive measurements first. Each step runs under `timeout` with its whole output kept (FILE.log) and the
# next step runs whether it passed, failed or timed out. Writes one markdown file, FILE (default gpu_check.md, or
# $OUT/gpu_check.md when $OUT is set), to paste into bench/RESULTS.md: a summary table (step, status, seconds,
# limit), then each step's command and output. The limits add up to at most 590 s: the script ends within 10
# minutes (plus the machine's start). They come from the first run on an H200 (bench/RESULTS.md, "GPU check 1"),
# where first-call compiles and autotuning took most of each step. Exit status 0 when every step passed, else 1.
#
# --dry-run checks all of this on a CPU in about a minute: the same steps through the same wrapper, with the GPU
# hidden, so the benchmarks parse their options and exit, and pytest only collects its selection (an empty or
# broken selection fails). For tests of the control flow: GPU_CHECK_FAIL=step1,step2 makes those steps fail,
# GPU_CHECK_HANG=step makes it hang past a 2 s limit, GPU_CHECK_STUB=1 replaces every other command by `true`.
set -u
cd "$(dirname "$0")/.."

out="${OUT:+$OUT/}gpu_check.md"
dry=0
args="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--out FILE] [--dry-run]" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$(dirname "$out")"
log="$out.log"
summary=$(mktemp)
body=$(mktemp)
trap 'rm -f "$summary" "$body"' EXIT
: > "$log"
failed=0
total=0
export PYTHONUNBUFFERED=1
pytest="python -m pytest -q -p no:cacheprovider"
xdist=""  # the tests compile their kernels in 8 processes where pytest-xdist is installed (the GPU image has it)
if [ $dry = 0 ] && python -c "import xdist" 2> /dev/null; then xdist="-n 8"; fi
if [ $dry = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the benchmarks check their options, find no GPU and exit
    pytest="$pytest --collect-only"
fi

listed() {  # listed NAME LIST: is NAME one of the comma-separated LIST?
    case ",$2," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

# step NAME LIMIT FORMAT COMMAND: run COMMAND under `timeout LIMIT`, append its status to the summary and its
# output to the body (FORMAT md: as it is, a benchmark's markdown table; text: fenced) and the full log.
step() {
    local name=$1 limit=$2 format=$3 cmd=$4
    total=$((total + limit))
    if [ $dry = 1 ]; then limit=60; fi
    if [ "${GPU_CHECK_STUB:-}" = 1 ]; then cmd=true; fi
    if listed "$name" "${GPU_CHECK_FAIL:-}"; then cmd="echo simulated failure; false"; fi
    if listed "$name" "${GPU_CHECK_HANG:-}"; then cmd="sleep 600"; limit=2; fi
    local output start=$SECONDS rc status
    output=$(mktemp)
    timeout --kill-after=10 "$limit" bash -c "$cmd" > "$output" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after $limit s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    if [ $rc != 0 ]; then failed=$((failed + 1)); fi
    echo "[gpu_check] $name: $status ($((SECONDS - start)) s)"
    printf '| %s | %s | %d | %d |\n' "$name" "$status" $((SECONDS - start)) "$2" >> "$summary"
    {
        printf '\n### %s: %s\n\n`%s`\n\n' "$name" "$status" "$4"
        if [ "$format" = md ]; then tail -n 150 "$output"; else printf '```text\n'; tail -n 80 "$output"; printf '```\n'; fi
    } >> "$body"
    { echo "===== $name: $status"; echo "\$ $4"; cat "$output"; } >> "$log"
    rm -f "$output"
}

versions="import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step env 10 text "python -c \"$versions\"; if command -v nvidia-smi > /dev/null; then nvidia-smi; fi"
step attention-grads 140 text "python bench/attention_grads.py"  # which gradient is wrong where (first check's bwd)
step tests 90 text "$pytest $xdist tests/test_attention_kernel.py tests/test_fp8.py \
-k 'forward_real_sizes or gradients_real_sizes or decode or rounds_like_torch or propagates_nan or 2_31'"
step attention 50 md "python bench/attention.py --seq-lens 8192 --head-dims 128 --kv-heads 8,1 --windows none \
--providers triton,triton-deterministic,sdpa-flash,sdpa-cudnn"
step fp8-gemm 30 md "python bench/fp8.py --sections gemm --squares 8192 --layers none"
step window 35 md "python bench/attention.py --seq-lens 8192 --head-dims 128 --kv-heads 8 --windows 1024 \
--providers triton,flex,sdpa-cudnn"
step train 130 md "python bench/train.py --models 1b --steps 5 --warmup 2 --no-fp8 --optimizers adamw"
step decode 40 md "python bench/decode.py --contexts 1024,8192 --steps 16"
step fp8-quantize-mlp 40 md "python bench/fp8.py --sections quantize,linear --layers none"
step quant-gemm 25 md "python bench/quant.py --sections gemm"  # issue 27: the int8 / int4 weight-only GEMM

if [ $total -gt 590 ]; then
    echo "| limits | failed: they add up to $total s > 590 s | 0 | $total |" >> "$summary"
    failed=$((failed + 1))
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1)
{
    printf '## GPU check: %s, %s%s\n\n' "${gpu:-no GPU}" "$(date -u +%Y-%m-%d)" \
        "$([ $dry = 1 ] && echo ', dry run')"
    printf 'command: `bash bench/gpu_check.sh %s`; %d of the steps failed; the limits add up to %d s; full output in %s\n\n' \
        "$args" "$failed" "$total" "$(basename "$log")"
    printf '| step | status | seconds | limit |\n|---|---|---|---|\n'
    cat "$summary" "$body"
} > "$out"
echo "[gpu_check] wrote $out ($failed failed)"
[ $failed = 0 ]
