#!/bin/bash
# Multi-GPU MTIL order I with ZSCL on one SLURM node (4 GPUs, DDP).
#
#   sbatch scripts/slurm_mtil.sh /path/to/data runs/zscl-mtil1
#
# Lightning reads SLURM's environment (SLURM_NTASKS, SLURM_PROCID, ...) and starts one process per task,
# so launch one task per GPU with srun; every rank runs the same `zscl sequence` command. Rerunning the
# script with the same output folder resumes the sequence (mid-task included).
#
# The global batch is data.batch_size x devices x nodes: the reference uses 64 task + 64 reference
# images per step, so 4 GPUs use --data.batch_size 16 (the reference batch follows the task batch).
#SBATCH --job-name=zscl-mtil1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=200G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue

set -euo pipefail
DATA=${1:?usage: sbatch scripts/slurm_mtil.sh DATA_ROOT OUT_DIR}
OUT=${2:?usage: sbatch scripts/slurm_mtil.sh DATA_ROOT OUT_DIR}

srun zscl sequence \
  --config configs/benchmark/mtil_order1.yaml \
  --config configs/method/zscl.yaml \
  --out "$OUT" \
  --data.data_root "$DATA" \
  --data.batch_size 16 \
  --data.num_workers 7 \
  --trainer.accelerator gpu \
  --trainer.devices 4 \
  --trainer.num_nodes "${SLURM_NNODES:-1}" \
  --trainer.strategy ddp \
  --progress tqdm
