#!/usr/bin/env bash
# Run one rank of launch/train.py under a foreign launcher (Open MPI or Slurm's srun):
# translate the launcher's rank variables into the torch.distributed ones that
# deepspeed.init_distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
set -euo pipefail
if [ -n "${OMPI_COMM_WORLD_RANK:-}" ]; then
    export RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK
elif [ -n "${SLURM_PROCID:-}" ]; then
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
else
    echo "_rank_env.sh: neither Open MPI (OMPI_COMM_WORLD_RANK) nor Slurm (SLURM_PROCID) started this process" >&2
    exit 2
fi
: "${MASTER_ADDR:?MASTER_ADDR must be set by the launching script}"
: "${MASTER_PORT:?MASTER_PORT must be set by the launching script}"
export CELORA_LAUNCHER=${CELORA_LAUNCHER:-external}
exec python3 "$(dirname "$0")/train.py" "$@"
