#!/usr/bin/env bash
# Reproduce the shipped tiny CLIP of the synthetic world:
#   zscl/synthetic/weights/zscl-synth-tiny.safetensors
# (contrastive pretraining from scratch, PretrainConfig defaults; ~15 min on 2 CPU cores).
# Usage: scripts/pretrain_synthetic.sh [OUT] [extra `zscl synthetic pretrain` options]
# Bit-for-bit equality needs the same torch build and thread count (CPU float reductions differ).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/../zscl/synthetic/weights/zscl-synth-tiny.safetensors}"
shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread: the same float reductions everywhere
exec python -m zscl synthetic pretrain --out "$out" --seed 0 "$@"
