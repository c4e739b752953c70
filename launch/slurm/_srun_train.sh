#!/usr/bin/env bash
# Shared body of the batch scripts: rendezvous variables, requeue-safe resume, srun.
# Sourced by one_node.sbatch / multi_node.sbatch with the train.py flags in "$@".
set -euo pipefail
cd "${CELORA_HOME:-$SLURM_SUBMIT_DIR}"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
OUTPUT_DIR=${OUTPUT_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
resume=()
# A requeued job (preemption, node failure, --requeue) finds its own checkpoints and continues.
if [ -f "$OUTPUT_DIR/checkpoints/latest" ]; then
    echo "resuming from $OUTPUT_DIR/checkpoints ($(cat "$OUTPUT_DIR/checkpoints/latest"))"
    resume=(--resume "$OUTPUT_DIR")
elif [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    # requeued before its first checkpoint: this job's own partial run holds nothing to continue
    resume=(--overwrite-output-dir)
fi
echo "job $SLURM_JOB_ID: $SLURM_NNODES node(s), $SLURM_NTASKS rank(s), master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"
srun --kill-on-bad-exit=1 bash launch/_rank_env.sh --output-dir "$OUTPUT_DIR" "${resume[@]}" "$@"
