#!/usr/bin/env bash
# Run one rank of launch/train.py under a foreign launcher (Open MPI, MPICH, Intel MPI,
# MVAPICH2 or Slurm's srun): translate the launcher's rank variables into the
# torch.distributed ones that deepspeed.init_distributed reads (RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR/PORT). The launchers' own variables are read rather than asking
# MPI through mpi4py: an mpi4py build is bound to one MPI library's ABI, while every
# process manager exports these.
#   mpiexec -n 2 bash launch/_rank_env.sh ...        (MPICH / Intel MPI: PMI_RANK, PMI_SIZE)
set -euo pipefail
if [ -n "${OMPI_COMM_WORLD_RANK:-}" ]; then        # Open MPI
    export RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK
elif [ -n "${SLURM_PROCID:-}" ]; then              # srun
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
elif [ -n "${MV2_COMM_WORLD_RANK:-}" ]; then       # MVAPICH2
    export RANK=$MV2_COMM_WORLD_RANK WORLD_SIZE=$MV2_COMM_WORLD_SIZE LOCAL_RANK=$MV2_COMM_WORLD_LOCAL_RANK
elif [ -n "${PMI_RANK:-}" ] && [ -n "${PMI_SIZE:-}" ]; then   # MPICH (hydra), Intel MPI
    export RANK=$PMI_RANK WORLD_SIZE=$PMI_SIZE LOCAL_RANK=${MPI_LOCALRANKID:-${PMI_LOCAL_RANK:-0}}
else
    echo "_rank_env.sh: no rank variables from Open MPI (OMPI_COMM_WORLD_RANK), Slurm (SLURM_PROCID)," \
         "MVAPICH2 (MV2_COMM_WORLD_RANK) or MPICH / Intel MPI (PMI_RANK, PMI_SIZE)" >&2
    exit 2
fi
: "${MASTER_ADDR:?MASTER_ADDR must be set by the launching script}"
: "${MASTER_PORT:?MASTER_PORT must be set by the launching script}"
export CELORA_LAUNCHER=${CELORA_LAUNCHER:-external}
exec python3 "$(dirname "$0")/train.py" "$@"
