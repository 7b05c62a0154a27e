#!/bin/bash
# Multi-node mmggem training on SLURM, preemption- and time-limit-safe, requeueing itself.
#
#   source .venv/bin/activate    # the job inherits this shell's environment, PATH included
#   sbatch --nodes 4 launch/slurm.sh configs/vit_b16_ggem_cc3m.yaml output_dir=/checkpoints/b16-ggem
#
# Each task runs $PYTHON (default: the python on that PATH); PYTHON=/path/to/.venv/bin/python sbatch ...
# names an interpreter without activating anything.
#
# One task per GPU is started by srun itself (no torchrun in between), so each task's exit
# code reaches this script (srun returns the highest): mmggem exits 75 when SIGUSR1 (sent
# 120 s before the time limit, see --signal below), SIGTERM (preemption, scancel: SLURM
# signals every process of the job, loader workers included, and kills them KillWait
# seconds later) or train.time_limit stopped it after writing a checkpoint. The script then
# requeues the job, and the next start resumes from that checkpoint (train.resume=latest is
# passed below). Exit 74 means the disk filled while a checkpoint was written: requeueing
# would fill it again, so the job ends and says so. See docs/distributed.md.
#SBATCH --job-name=mmggem
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
EXIT_REQUEUE=75
EXIT_DISK_FULL=74

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export WORLD_SIZE=$SLURM_NTASKS
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
export PYTHON=${PYTHON:-python}

# Each task maps SLURM's ids onto torch's env:// variables, which accelerate reads.
srun --kill-on-bad-exit=0 bash -c '
  export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE
  exec "$PYTHON" -u -m mmggem.cli train "$@" train.resume=latest
' mmggem "$@"
status=$?

if [ "$status" -eq "$EXIT_REQUEUE" ]; then
  echo "mmggem stopped early with a checkpoint (exit $status): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if [ "$status" -eq "$EXIT_DISK_FULL" ]; then
  echo "mmggem could not write a checkpoint, the disk is full (exit $status): free space, then resubmit" \
       "the same command (it resumes from the last checkpoint)"
fi
exit "$status"
