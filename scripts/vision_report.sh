#!/usr/bin/env bash
# Reproduces docs/results/vision/: draw the synthetic data, fine-tune on the CPU (wall time measured), then
# score held-out answers with and without the image. Run from the repository root; needs the vision extra.
set -euo pipefail
PHIFORGE=${PHIFORGE:-phiforge}
PYTHON=${PYTHON:-python}
DATA=data/vision-synth
RUN=runs/vision-synth
OUT=docs/results/vision
mkdir -p "$OUT"

$PHIFORGE vision synth --out "$DATA" --n 3000 --seed 0
rm -rf "$RUN"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date +%s)
$PHIFORGE vision finetune --config configs/vision-synth-cpu.yaml
wall=$(( $(date +%s) - start ))
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
$PHIFORGE vision eval --checkpoint "$RUN" --data "$DATA/heldout.json" --out "$OUT/eval.json" | tee "$OUT/eval.txt"

cp "$RUN/metrics.jsonl" "$RUN/config.yaml" "$OUT/"
$PYTHON - "$OUT/run.json" "$wall" "$load_before" "$load_after" <<'PY'
import json, os, platform, sys, torch, yaml
out, wall, before, after = sys.argv[1:]
threads = yaml.safe_load(open(os.path.join(os.path.dirname(out), "config.yaml")))["threads"]
json.dump({"finetune_wall_s": int(wall), "loadavg_before": before, "loadavg_after": after,
           "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "torch_threads": threads}, open(out, "w"), indent=2)
PY
echo "fine-tuning wall time: ${wall} s"
