#!/usr/bin/env bash
# Every figure of the README's "Performance" table, measured on one GPU (written for an H100).
#
#   scripts/bench_gpu.sh [OUT_DIR]        (default: bench_results/)
#
# Each benchmark writes OUT_DIR/<name>.json (the JSON object `zscl bench` prints); the last step
# prints the table's rows in Markdown from those files. Needs the zscl package installed with
# CUDA torch; takes about 10 minutes (the fp32 run and torch.compile dominate).
set -euo pipefail

OUT=${1:-bench_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.csv" || true

# The issue's setup: ViT-B/16 (random init), task batch 64 + reference batch 64, 100 classes, 13,000 reference texts.
SETUP=(--model ViT-B-16 --batch 64 --ref-batch 64 --classes 100 --ref-texts 13000)

bench() {  # bench NAME SUBCOMMAND [OPTIONS...]
  local name=$1; shift
  echo "== $name: zscl bench $*" >&2
  zscl bench "$@" --json "$OUT/$name.json" > /dev/null
}

# 1. Training step: ZSCL (image + text KD, WC 1.0, WE every 100) and plain fine-tuning.
bench step_zscl_bf16_compile   step "${SETUP[@]}" --method zscl --precision bf16-mixed --compile on --steps 50 --warmup 5
bench step_zscl_bf16_eager     step "${SETUP[@]}" --method zscl --precision bf16-mixed --compile off --steps 50 --warmup 5
bench step_zscl_fp32_eager     step "${SETUP[@]}" --method zscl --precision 32-true --compile off --steps 20 --warmup 2
bench step_finetune_bf16_compile step "${SETUP[@]}" --method finetune --precision bf16-mixed --compile on --steps 50 --warmup 5
bench step_paper_text_1k_bf16_compile step "${SETUP[@]}" --method zscl_paper_text --text-batch 1000 \
  --precision bf16-mixed --compile on --steps 30 --warmup 5

# 2. Zero-shot evaluation: JPEG decode path vs the uint8 cache (ViT-B/16, bf16 autocast, batch 128).
bench eval_vitb16 eval --model ViT-B-16 --images 5000 --classes 100 --batch 128 --num-workers 16 --precision bf16

# 3. Training loader against the measured ZSCL step: 16 CPU workers (PIL), and nvJPEG on the GPU.
STEP_MS=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["ms_per_step_median"])' \
  "$OUT/step_zscl_bf16_compile.json")
bench loader_cpu16 loader --images 5000 --classes 100 --batch 64 --ref-batch 64 --num-workers 16 \
  --batches 100 --warmup-batches 10 --step-ms "$STEP_MS"
bench loader_gpu_decode loader --images 5000 --classes 100 --batch 64 --ref-batch 64 --num-workers 4 \
  --batches 100 --warmup-batches 10 --decode gpu --step-ms "$STEP_MS"

# 4. The table rows, from the JSON files.
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
load = lambda name: json.loads((out / f"{name}.json").read_text())
fmt = lambda v, spec: "—" if v is None else format(v, spec)
print(f"device: {load('step_zscl_bf16_compile')['device']}\n")
print("| configuration | ms/step (median) | peak memory (GiB) | TFLOP/step | MFU | compile (s) |")
print("|---|---|---|---|---|---|")
for name in ("step_zscl_bf16_compile", "step_zscl_bf16_eager", "step_zscl_fp32_eager",
             "step_finetune_bf16_compile", "step_paper_text_1k_bf16_compile"):
    r = load(name)
    print(f"| {name} | {r['ms_per_step_median']:.1f} | {fmt(r['peak_mem_gib'], '.1f')} | "
          f"{fmt(r['tflops_per_step'], '.2f')} | {fmt(r['mfu'], '.1%')} | {fmt(r['compile_s'], '.0f')} |")
e = load("eval_vitb16")
print(f"\neval: JPEG {e['jpeg_img_s']:.0f} img/s, cache {e['cache_img_s']:.0f} img/s "
      f"(build {e['cache_build_s']:.1f} s), model only {e['model_img_s']:.0f} img/s")
for name in ("loader_cpu16", "loader_gpu_decode"):
    r = load(name)
    print(f"{name}: {r['img_s']:.0f} img/s, needs {r['needed_img_s']:.0f} img/s -> keeps_up={r['keeps_up']}")
PY
