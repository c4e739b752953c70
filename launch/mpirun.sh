#!/usr/bin/env bash
# launch/train.py under Open MPI: one process per GPU (or per CPU rank with DS_ACCELERATOR=cpu).
#
#   launch/mpirun.sh -np 2 -- --max-steps 20                              # one machine
#   launch/mpirun.sh -np 16 --hostfile hosts.txt -- --deepspeed_config ds_configs/zero3.json
#
# Everything before `--` goes to mpirun, everything after it to launch/train.py.
# MASTER_ADDR defaults to the first host of --hostfile (127.0.0.1 without one).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mpi_args=() hostfile=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        --hostfile|-hostfile|--machinefile) hostfile=$2; mpi_args+=("$1" "$2"); shift 2 ;;
        *) mpi_args+=("$1"); shift ;;
    esac
done
[ "${1:-}" = "--" ] && shift
command -v mpirun >/dev/null || { echo "mpirun not found: install Open MPI (apt-get install openmpi-bin)" >&2; exit 2; }
if [ -n "$hostfile" ]; then
    [ -r "$hostfile" ] || { echo "hostfile $hostfile not readable" >&2; exit 2; }
    export MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}
else
    export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    # one machine: shared memory between ranks, TCP only over loopback
    mpi_args+=(--mca btl self,vader --mca oob_tcp_if_include lo)
fi
export MASTER_PORT=${MASTER_PORT:-29500}
root=()
[ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
exports=()
for var in MASTER_ADDR MASTER_PORT PATH PYTHONPATH DS_ACCELERATOR OMP_NUM_THREADS CELORA_CACHE; do
    [ -n "${!var:-}" ] && exports+=(-x "$var")
done
exec mpirun "${root[@]}" "${mpi_args[@]}" "${exports[@]}" bash "$here/_rank_env.sh" "$@"
