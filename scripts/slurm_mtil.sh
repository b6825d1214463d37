#!/bin/bash
# A continual benchmark with one method under SLURM, one task per GPU, DDP. Defaults: MTIL order I with
# ZSCL on one node with 4 GPUs.
#
#   sbatch scripts/slurm_mtil.sh DATA_ROOT OUT_DIR [extra zscl sequence arguments...]
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 scripts/slurm_mtil.sh /data runs/zscl-mtil1
#   ZSCL_METHOD=configs/method/lwf.yaml ZSCL_BATCH_SIZE=8 sbatch scripts/slurm_mtil.sh /data runs/lwf --steps 500
#
# Nodes and GPUs come from sbatch's options (they override the #SBATCH lines below); the trainer's
# devices and num_nodes follow from the allocation (SLURM_NTASKS_PER_NODE, SLURM_NNODES). From the
# environment (with today's defaults):
#   ZSCL_BENCHMARK   benchmark config       (configs/benchmark/mtil_order1.yaml)
#   ZSCL_METHOD      method config          (configs/method/zscl.yaml)
#   ZSCL_BATCH_SIZE  per-device batch size  (16: 4 GPUs x 16 = the reference's global batch of 64)
#   ZSCL_NUM_WORKERS data loader workers    (7 per task, with --cpus-per-task=8)
#   ZSCL_ACCELERATOR gpu | cpu              (gpu; cpu runs DDP over gloo, as the cluster tests do)
#   ZSCL_CMD         the zscl command       (zscl; e.g. "python -m zscl")
#
# The global batch is ZSCL_BATCH_SIZE x tasks-per-node x nodes. Lightning reads the ranks from SLURM
# (SLURM_NTASKS, SLURM_PROCID, ...; its log says SLURMEnvironment); srun starts one process per task.
#
# Preemption and time limits: SLURM sends SIGUSR1 120 s before the end (--signal); every rank stops at
# the next step boundary, the task's checkpoint (OUT_DIR/tasks/NN-<Dataset>/last.ckpt) is written, the
# job requeues itself (--requeue) and exits. The requeued job reruns this script, which resumes from that
# checkpoint; its log says "requeued after SIGUSR1 at task T/N (NN-<Dataset>) step S; resumed from ...".
# Rerunning the script by hand with the same OUT_DIR resumes the same way.
#SBATCH --job-name=zscl-mtil
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=200G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120

set -euo pipefail
usage="usage: sbatch scripts/slurm_mtil.sh DATA_ROOT OUT_DIR [zscl sequence arguments...]"
DATA=${1:?$usage}
OUT=${2:?$usage}
shift 2

read -r -a ZSCL <<< "${ZSCL_CMD:-zscl}"
echo "slurm_mtil.sh: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}, ${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-4} task(s) -> $OUT"

srun "${ZSCL[@]}" sequence \
  --config "${ZSCL_BENCHMARK:-configs/benchmark/mtil_order1.yaml}" \
  --config "${ZSCL_METHOD:-configs/method/zscl.yaml}" \
  --out "$OUT" \
  --data.data_root "$DATA" \
  --data.batch_size "${ZSCL_BATCH_SIZE:-16}" \
  --data.num_workers "${ZSCL_NUM_WORKERS:-7}" \
  --trainer.accelerator "${ZSCL_ACCELERATOR:-gpu}" \
  --trainer.devices "${SLURM_NTASKS_PER_NODE:-4}" \
  --trainer.num_nodes "${SLURM_NNODES:-1}" \
  --trainer.strategy ddp \
  --progress tqdm \
  "$@"
