#!/usr/bin/env bash
# Usage: bash benchmarks/h200-2026-12-04/bench_h200.sh OUT (it ran as .whl/bench_h200.sh on the device)  (PYTHONPATH set by the caller). Prioritised, deadline-guarded.
O=$1; R=/tmp/res; mkdir -p "$R"; DEADLINE=${DEADLINE:-400}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$O/gpu.csv" 2>&1; cat "$O/gpu.csv"
python3 -c 'import torch,torchvision,lightning,open_clip,timm;print("torch",torch.__version__,"cuda",torch.version.cuda,"tv",torchvision.__version__,"L",lightning.__version__,"open_clip",open_clip.__version__,"timm",timm.__version__)'
SETUP=(--model ViT-B-16 --batch 64 --ref-batch 64 --classes 100 --ref-texts 13000)
merge() { python3 - "$R" "$O/all.json" <<'PY'
import json,sys,pathlib
r=pathlib.Path(sys.argv[1]); d={p.stem: json.loads(p.read_text()) for p in sorted(r.glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(d,indent=1))
PY
}
bench() {  # bench NAME MIN_LEFT SUB ARGS...  (skipped if fewer than MIN_LEFT s remain before DEADLINE)
  local name=$1 need=$2; shift 2; local left=$((DEADLINE - SECONDS))
  if (( left < need )); then echo "== SKIP $name (left ${left}s < ${need}s)"; return; fi
  echo "== [$SECONDS s] $name: zscl bench $*"
  timeout $left python3 -m zscl bench "$@" --json "$R/$name.json" > "$R/$name.stdout" || echo "== FAILED $name rc=$?"
  echo "== [$SECONDS s] done $name"; merge
}
bench step_zscl_bf16_compile 0 step "${SETUP[@]}" --method zscl --precision bf16-mixed --compile on --steps 50 --warmup 5
STEP_MS=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["ms_per_step_median"])' "$R/step_zscl_bf16_compile.json" 2>/dev/null || echo 50)
bench eval_vitb16 0 eval --model ViT-B-16 --images 5000 --classes 100 --batch 128 --num-workers 16 --precision bf16
bench loader_cpu16 0 loader --images 5000 --classes 100 --batch 64 --ref-batch 64 --num-workers 16 --batches 100 --warmup-batches 10 --step-ms "$STEP_MS"
for n in step_zscl_bf16_compile eval_vitb16 loader_cpu16; do cp "$R/$n.json" "$O/" 2>/dev/null; done
bench step_zscl_bf16_eager 60 step "${SETUP[@]}" --method zscl --precision bf16-mixed --compile off --steps 50 --warmup 5
bench loader_gpu_decode 40 loader --images 5000 --classes 100 --batch 64 --ref-batch 64 --num-workers 4 --batches 100 --warmup-batches 10 --decode gpu --step-ms "$STEP_MS"
bench step_zscl_fp32_eager 60 step "${SETUP[@]}" --method zscl --precision 32-true --compile off --steps 20 --warmup 2
bench step_finetune_bf16_compile 120 step "${SETUP[@]}" --method finetune --precision bf16-mixed --compile on --steps 50 --warmup 5
bench step_paper_text_1k_bf16_compile 120 step "${SETUP[@]}" --method zscl_paper_text --text-batch 1000 --precision bf16-mixed --compile on --steps 30 --warmup 5
merge
python3 - "$O/all.json" <<'PY'
import json,sys
for k,v in json.load(open(sys.argv[1])).items():
    keys=[x for x in ("ms_per_step_median","ms_per_step_min","first_step_ms","compile_s","setup_s","peak_mem_gib","peak_mem_reserved_gib","tflops_per_step","achieved_tflops","mfu","jpeg_img_s","cache_img_s","cache_build_s","model_img_s","cache_matches","img_s","needed_img_s","keeps_up","torch","device") if x in v]
    print(k, {x:(round(v[x],3) if isinstance(v[x],float) else v[x]) for x in keys})
PY
echo "== total ${SECONDS}s"
