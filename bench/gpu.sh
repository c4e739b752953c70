#!/usr/bin/env bash
# Every GPU benchmark in one run (~8 minutes on one H200), each table into ${OUT:-bench_out}/.
#
#   bash bench/gpu.sh                      # CUDA: the measurements BENCHMARKS.md is missing
#   DEVICE=cpu bash bench/gpu.sh           # the same steps in their --smoke sizes (control flow, ~1 min)
#   bash bench/gpu.sh --dry-run            # print the steps and their time limits, run nothing
#   STEPS="head e2e" bash bench/gpu.sh     # a subset, e.g. to re-run what timed out
#
# Steps (name: what, time limit on CUDA):
#   layer     bench/layer_backward.py, full LLaMA-3-8B / 3.2-1B projection shapes, bf16,
#             T = 4096 and 16384, keeps 0.3/0.55/0.65/1.0, dense vs torch vs Triton   140 s
#   head      bench/head_backward.py, 49K / 128K / 256K vocab heads, bf16, T = 4096      75 s
#   e2e       bench/end_to_end.py, LLaMA-3.2-1B shapes, bf16, 1 x 2048 tokens, --head-keep 0.1:
#             PEFT LoRA, CE-LoRA released, adaptive, and released + head in the same
#             interleaved rounds (so the run is "with and without" the sparse head)   95 s
#   e2e_ckpt  the same with --gradient-checkpointing                                   95 s
#   backend   bench/backend_choice.py --device cuda, only if that file exists          45 s
#   paper     bench/scale_on_paper.py --wide (the cost model's prediction, no GPU)     15 s
# Each step runs under `timeout`, and no step may run past the whole run's BUDGET_S (470 s by
# default): a slow step loses its own time, not the next step's. Rows are printed as they are
# measured, so a step cut off by its limit still leaves the rows it finished.
#
# Output: one file per step, NAME.md (its stdout: the header line and the markdown table),
# all stderr in stderr.log, and summary.txt (machine, versions, each step's exit status and
# seconds; 124 = hit its time limit). 8 files at most: what the device tool brings back.
# Needs torch (+ triton on CUDA), transformers and peft; not deepspeed.
set -u
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench_out}
BUDGET_S=${BUDGET_S:-470}
STEPS=${STEPS:-layer head e2e e2e_ckpt backend paper}
DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $arg (use --dry-run, or DEVICE= STEPS= OUT= BUDGET_S= PYTHON=)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ]; then
    LAYER=(bench/layer_backward.py --device cuda --dtype bf16 --shapes llama --tokens 4096 16384 --repeats 10)
    HEAD=(bench/head_backward.py --device cuda --dtype bf16 --tokens 4096 --repeats 10
          --shapes smollm2-135m,llama-3.2-1b,gemma-2b)
    E2E=(bench/end_to_end.py --device cuda --dtype bf16 --model llama-3.2-1b --seq-len 2048 --repeats 10
         --head-keep 0.1)
    LIMITS=(140 75 95 95 45 15)
else  # the same scripts at their smoke sizes: checks this file's control flow on a CPU
    LAYER=(bench/layer_backward.py --device cpu --smoke)
    HEAD=(bench/head_backward.py --smoke)
    E2E=(bench/end_to_end.py --smoke --head-keep 0.1)
    LIMITS=(60 60 60 60 60 30)
fi

START=$SECONDS
[ "$DRY_RUN" = 0 ] && mkdir -p "$OUT_DIR"  # a dry run writes nothing, not even the folder
SUMMARY="$OUT_DIR/summary.txt"

# run_step NAME LIMIT_S COMMAND...: stdout to NAME.md, stderr appended to stderr.log.
run_step() {
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) echo "[gpu.sh] $name: not in STEPS, skipped"; return 0 ;; esac
    local left=$((BUDGET_S - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$DRY_RUN" = 1 ]; then
        echo "[gpu.sh] $name (limit ${limit}s): $*"
        return 0
    fi
    if [ "$limit" -lt 10 ]; then
        echo "[gpu.sh] $name: skipped, ${left}s of the ${BUDGET_S}s budget left" | tee -a "$SUMMARY"
        return 0
    fi
    echo "[gpu.sh] $(date -u +%H:%M:%S) $name (limit ${limit}s, $((SECONDS - START))s elapsed): $*"
    echo "=== $name: $*" >>"$OUT_DIR/stderr.log"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>>"$OUT_DIR/stderr.log" | tee "$OUT_DIR/$name.md"
    rc=${PIPESTATUS[0]}
    local status=ok
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMED OUT (partial table)"
    [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="FAILED (see stderr.log)"
    echo "[gpu.sh] $name: rc=$rc $status in $((SECONDS - t0))s" | tee -a "$SUMMARY"
}

if [ "$DRY_RUN" = 0 ]; then
    {
        echo "gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) DEVICE=$DEVICE BUDGET_S=$BUDGET_S STEPS=$STEPS"
        git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
        [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$PY" -c "import importlib.util as u, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available()); [print(m, __import__(m).__version__ if u.find_spec(m) else 'absent')
for m in ('triton', 'transformers', 'peft', 'deepspeed')]"
    } 2>&1 | tee "$SUMMARY"
fi

run_step layer "${LIMITS[0]}" "$PY" "${LAYER[@]}"
run_step head "${LIMITS[1]}" "$PY" "${HEAD[@]}"
run_step e2e "${LIMITS[2]}" "$PY" "${E2E[@]}"
run_step e2e_ckpt "${LIMITS[3]}" "$PY" "${E2E[@]}" --gradient-checkpointing
# --- backend choice (bench/backend_choice.py, being written by the lead): runs only once it exists ---
if [ -f bench/backend_choice.py ]; then
    run_step backend "${LIMITS[4]}" "$PY" bench/backend_choice.py --device "$DEVICE"
else
    echo "[gpu.sh] backend: bench/backend_choice.py not present, skipped"
fi
run_step paper "${LIMITS[5]}" "$PY" bench/scale_on_paper.py --wide

[ "$DRY_RUN" = 0 ] && echo "[gpu.sh] done in $((SECONDS - START))s; tables in $OUT_DIR/"
[ "$DRY_RUN" = 0 ] && cat "$SUMMARY"
exit 0
