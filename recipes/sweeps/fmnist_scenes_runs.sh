#!/usr/bin/env bash
# Every training run behind docs/benchmarks/fmnist-scenes.md beyond `make default-bundle`, one
# CPU-heavy job at a time, in the order they were run. A step whose output exists is skipped and
# an interrupted one resumes (--resume), so running this again continues the study.
#   make study      # = make default-bundle, this script, then platform evaluate on the sweep
# Usage: fmnist_scenes_runs.sh [WORKDIR]   (default runs/default; PLATFORM=path/to/platform)
set -euo pipefail
W=${1:-runs/default}
P=${PLATFORM:-platform}
R=$(cd "$(dirname "$0")/.." && pwd)
D=$W/fm64
T=$W/teacher-cls
COMMON=(--no-progress --resume)
test -f "$T/teacher.json" || { echo "no teacher in $T: run make default-bundle first" >&2; exit 2; }

es() {  # Entropic Student at β $1: stage 1, then stage 2 (classification)
  local B=$W/es-b$1
  test -f "$B/manifest.json" || "$P" distill --recipe "$R/fmnist_scenes_distill.yaml" --teacher "$T" --data "$D" \
    --beta "$1" --out "$B" "${COMMON[@]}"
  test -f "$B/.cls" || { "$P" finetune --recipe "$R/fmnist_scenes_finetune.yaml" --bundle "$B" --teacher "$T" \
    --data "$D" "${COMMON[@]}" && touch "$B/.cls"; }
}
rac() {  # RAC with $1 residual blocks at λ $2, joint training
  local B=$W/rac$1-l$2
  test -f "$B/manifest.json" || "$P" train --recipe "$R/fmnist_scenes_rac_joint.yaml" --teacher "$T" --data "$D" \
    --blocks "$1" --lmbda "$2" --out "$B" "${COMMON[@]}"
}
image_codec() {  # CompressAI architecture $1 at quality $2 (its N, M and λ), 2 epochs, lr 5e-4 then 5e-5
  local B=$W/$1-q$2
  test -f "$B/codec.json" || "$P" train-image-codec --arch "$1" --quality "$2" --data "$D" --out "$B" \
    --epochs 2 --lr 5e-4 --lr-drop 1 "${COMMON[@]}"
}

# Classification: four rates per feature codec, four qualities per learned image codec.
for beta in 0.08 0.16 0.02; do es "$beta"; done          # β 0.32 comes from make default-bundle
for lmbda in 1.92 0.48 0.96 0.64; do rac 0 "$lmbda"; done
for lmbda in 1.92 0.96 0.48 0.64; do rac 8 "$lmbda"; done
for q in 1 2 3 5; do image_codec bmshj2018-factorized "$q"; done
for q in 1 2 3 5; do image_codec mbt2018-mean "$q"; done
for lmbda in 1.92 0.96 0.48 0.64; do rac 4 "$lmbda"; done
echo "study runs done in $W"
