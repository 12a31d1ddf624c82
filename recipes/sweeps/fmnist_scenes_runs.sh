#!/usr/bin/env bash
# Every training run behind docs/benchmarks/fmnist-scenes.md, one CPU-heavy job at a time. A step
# whose output exists is skipped and an interrupted one resumes (--resume), so running this again
# continues where it stopped.
#   fmnist_scenes_runs.sh WORKDIR default   # the default bundle's runs (make default-bundle, which then packs it)
#   fmnist_scenes_runs.sh WORKDIR study     # every other run of the study, those that decide the default first
#                                           # (make study runs default first)
#   fmnist_scenes_runs.sh WORKDIR extra     # the study, then the same comparisons on Entropic Student, RAC N = 0
# PLATFORM=path/to/platform; VR_LMBDAS (1.92,…,0.03) the variable-rate runs' seven rates (the default's
# too); the study trains four of them that span the range alone for the comparison (SPAN_LMBDAS), extra
# the other three.
set -euo pipefail
W=${1:?usage: fmnist_scenes_runs.sh WORKDIR default|study|extra}
WHAT=${2:?usage: fmnist_scenes_runs.sh WORKDIR default|study|extra}
P=${PLATFORM:-platform}
R=$(cd "$(dirname "$0")/.." && pwd)
D=$W/fm64
T=$W/teacher-cls
# The variable-rate runs' seven rates, a factor 2 apart. With the entropy model refitted after training
# (--refit-steps) six λ from 3.84 to 0.24 coded at 63-175 B per image, 2.8x (rac8-vr-mt-narrow in the
# study's notes): the top rates' bytes had been the priors' excess, not information.
VR_LMBDAS=${VR_LMBDAS:-1.92,0.96,0.48,0.24,0.12,0.06,0.03}
SPAN_LMBDAS=${SPAN_LMBDAS:-1.92,0.48,0.12,0.03}  # four of them spanning the range, trained alone first
TEACHERS=("classification=$T" "detection=$W/teacher-det" "segmentation=$W/teacher-seg")
COMMON=(--no-progress --resume)
# Every run but the teachers validates each epoch on a fixed 1,000 of the 2,000 val scenes (the study's
# own subset size): a variable-rate run validates every rate, each task, every epoch (seven rates, three
# tasks: ~6 min here on all 2,000), and these figures only draw the learning curves and pick the best
# epoch; the study and `bundle measure` measure the bundles themselves.
RUN=("${COMMON[@]}" --val-limit 1000)
DET=(--head-config fpn_channels=64)
SEG=(--head-config aspp_channels=64 output_stride=8 "atrous_rates=[1,2,3]")
# the same narrow FPN and ASPP (DeepLabv3 dilated to output stride 8) for heads trained together (--tasks)
NARROW=(--head-config detection.fpn_channels=64 segmentation.aspp_channels=64 segmentation.output_stride=8
  "segmentation.atrous_rates=[1,2,3]")

once() {  # once MARKER COMMAND…: run COMMAND unless MARKER exists, then create it
  local marker=$1; shift
  test -e "$marker" || { "$@" && touch "$marker"; }
}
teacher() {  # the uncompressed ResNet-18 teacher of task $1 (detection/segmentation start from cls's)
  local out=$W/teacher-$1
  case $1 in
    cls) test -f "$out/teacher.json" || "$P" teacher --recipe "$R/fmnist_scenes_teacher.yaml" --data "$D" \
           --out "$out" --keep-checkpoint "${COMMON[@]}" ;;
    *) test -f "$out/teacher.json" || "$P" teacher --recipe "$R/fmnist_scenes_teacher_$1.yaml" --checkpoint "$T" \
         --data "$D" --out "$out" --keep-checkpoint "${COMMON[@]}" ;;
  esac
}
es() {  # Entropic Student at β $1: stage 1, then stage 2 (classification, decoder trained); $2 = long: twice
  # the recipe's epochs (10 + 8 = 18, lr drops after 8 and 6), as many passes as RAC's 18-epoch runs;
  # $3 = multi: stage 1 distils from all three task teachers (weight 1 each) into $W/es-b$1-mt
  local B=$W/es-b$1 E1=() E2=() TEACH=("$T")
  [ "${2:-}" != long ] || { B=$B-e18; E1=(--epochs 10 --milestones 8); E2=(--epochs 8 --step-size 6); }
  [ "${3:-}" != multi ] || { B=$B-mt; TEACH=("${TEACHERS[@]}"); }
  test -f "$B/manifest.json" || "$P" distill --recipe "$R/fmnist_scenes_distill.yaml" --teacher "${TEACH[@]}" \
    --data "$D" --beta "$1" --out "$B" "${E1[@]}" "${RUN[@]}"
  once "$B/.cls" "$P" finetune --recipe "$R/fmnist_scenes_finetune.yaml" --bundle "$B" --teacher "$T" --data "$D" \
    "${E2[@]}" "${RUN[@]}"
}
shared_heads() {  # bundle $1 (ES or RAC): the classification head's layer2..4 become the shared trunk; detection
  # (narrow FPN) and segmentation (narrow ASPP, output stride 8) heads are trained on it
  local B=$1 S=(finetune --recipe "$R/fmnist_scenes_finetune.yaml" --bundle "$1" --teacher "$T" --data "$D" "${RUN[@]}")
  once "$B/.trunk" "$P" "${S[@]}" --shared-trunk --epochs 0 --workdir "$B.runs/shared-trunk"
  once "$B/.det" "$P" "${S[@]}" --task detection --shared-trunk "${DET[@]}"
  once "$B/.seg" "$P" "${S[@]}" --task segmentation --shared-trunk "${SEG[@]}"
}
own_heads() {  # a copy of bundle $1 whose detection and segmentation heads each train their own
  # layer2..4: $2 = fresh (heads as wide as the shared ones, fresh; into $1-own), teacher (the teachers'
  # whole heads, at their widths, trained as the reference does, the default; $1-tinit) or direct (the
  # teachers' whole heads, our one-stage task-loss recipe; $1-direct)
  local B=$1-own init=(--from-scratch) det=("${DET[@]}") seg=("${SEG[@]}")
  case $2 in
    teacher) B=$1-tinit; init=(--from-teacher --procedure reference); det=(); seg=() ;;
    direct) B=$1-direct; init=(--from-teacher --procedure direct); det=(); seg=() ;;
  esac
  local S=(finetune --recipe "$R/fmnist_scenes_finetune.yaml" --bundle "$B" --data "$D" --freeze-decoder "${init[@]}"
    "${RUN[@]}")
  test -d "$B" || { cp -r "$1" "$B.tmp" && mv "$B.tmp" "$B"; }
  once "$B/.own-det" "$P" "${S[@]}" --task detection --teacher "$W/teacher-det" "${det[@]}"
  once "$B/.own-seg" "$P" "${S[@]}" --task segmentation --teacher "$W/teacher-seg" "${seg[@]}"
}
joint_trunk() {  # a copy of bundle $1 (into $2) whose heads for the tasks $3 share one layer2..4
  # fine-tuned on all their losses at once (finetune --tasks; the trunk starts from the bundle's, else
  # from the first task's head); further arguments go to finetune (the recipe: 4 epochs, lr ÷10 after 3)
  local B=$2
  test -d "$B" || { cp -r "$1" "$B.tmp" && mv "$B.tmp" "$B"; }
  once "$B/.joint" "$P" finetune --recipe "$R/fmnist_scenes_finetune.yaml" --bundle "$B" --data "$D" \
    --tasks "$3" --teacher "${TEACHERS[@]}" "${@:4}" "${RUN[@]}"
}
rac_vr() {  # RAC with $1 residual blocks, variable-rate over the λ list $2 (joint, one run); $3 = multi:
  # distilled from all three task teachers; $4 = shared: one prior read at each rate's step (--prior shared)
  # instead of one prior per rate
  local B=$W/rac$1-vr TEACH=("$T") PRIOR=()
  [ "${3:-}" != multi ] || { B=$B-mt; TEACH=("${TEACHERS[@]}"); }
  [ "${4:-}" != shared ] || { B=$B-sp; PRIOR=(--prior shared); }
  test -f "$B/manifest.json" || "$P" train --recipe "$R/fmnist_scenes_rac_joint.yaml" --mode joint \
    --teacher "${TEACH[@]}" --data "$D" --blocks "$1" --lmbdas "$2" --out "$B" "${PRIOR[@]}" "${RUN[@]}"
}
rac() {  # RAC with $1 residual blocks at λ $2, $3 = joint or cls-fixed, for $4 epochs if given (the
  # recipe's 9 = Entropic Student's 5 + 4 otherwise)
  local B=$W/rac$1-l$2 E=()
  [ "$3" = joint ] || B=$B-clsfixed
  [ -z "${4:-}" ] || { B=$B-e$4; E=(--epochs "$4"); }
  test -f "$B/manifest.json" || "$P" train --recipe "$R/fmnist_scenes_rac_joint.yaml" --mode "$3" --teacher "$T" \
    --data "$D" --blocks "$1" --lmbda "$2" --out "$B" "${E[@]}" "${RUN[@]}"
}
image_codec() {  # CompressAI architecture $1 at quality $2 (its N, M and λ), 2 epochs, lr 5e-4 then 5e-5
  local B=$W/$1-q$2
  test -f "$B/codec.json" || "$P" train-image-codec --arch "$1" --quality "$2" --data "$D" --out "$B" \
    --epochs 2 --lr 5e-4 --lr-drop 1 "${COMMON[@]}"
}

# Both: the data and the three task teachers (every detection/segmentation figure is read against
# them, and the multi-task encoders distil from all three).
test -d "$D" || "$P" data fmnist-scenes --out "$D" --train 20000 --val 2000 --val-seen 2000 --size 64 --backgrounds photos
teacher cls
teacher det
teacher seg
case $WHAT in
  default)  # the default bundle (before packing): RAC N = 8 variable-rate over seven λ, distilled from
    # all three teachers; detection and segmentation heads started from their teachers and trained on
    # their own trunks as the reference does; then one trunk, started from the detection head's, shared
    # by the three full-width heads and fine-tuned on all three losses (the study's layout (c) from the
    # teachers' heads, below; 4 epochs, lr ÷10 after 3). Of the shared-trunk layouts it keeps the most:
    # within half a mAP of detection's own trunk and level on classification (segmentation: −5 mIoU).
    rac_vr 8 "$VR_LMBDAS" multi
    own_heads "$W/rac8-vr-mt" teacher
    joint_trunk "$W/rac8-vr-mt-tinit" "$W/rac8-vr-mt-tinit-joint" det,cls,seg --lr 0.001
    exit 0 ;;
  study|extra) ;;
  *) echo "fmnist_scenes_runs.sh: choose default, study or extra, not $WHAT" >&2; exit 2 ;;
esac

# The study on fmnist-scenes v2 (val: photographs no training scene uses), the runs that decide the
# default first: what one encoder for every task and every rate costs.
# 1. One encoder for every task and every rate (issues 21 §3 and 24): RAC N = 8 variable-rate over seven
#    λ distilled from all three teachers, with the server-side layouts: (a) own trunks from the task
#    teachers, trained as the reference does (three ResNet-18 trunks, ~66 MB in float16: never the
#    default, but what the others are measured against, and where (c) starts); (c) one trunk fine-tuned
#    on all three losses, shared, from the teachers' heads (the default's runs: make default-bundle ran
#    them already).
rac_vr 8 "$VR_LMBDAS" multi
own_heads "$W/rac8-vr-mt" teacher
# (c) from the teachers' heads: the trunk starts from the reference-trained detection head's layer2..4
# (detection is the head that needs the most training from scratch: 5 mAP after the 4 epochs of the
# narrow joint trunk in session 7, against the teacher's 23.5) and every head keeps its teacher's width,
# started from its teacher-started head; lr 1e-3, every head starts trained. A full-width RetinaNet
# head is ~8 M weights, so this layout fits 30 MB only in int8 (bundle pack --int8). The default.
joint_trunk "$W/rac8-vr-mt-tinit" "$W/rac8-vr-mt-tinit-joint" det,cls,seg --lr 0.001
# What variable rate costs (issue 24): RAC N = 8 trained alone at the four λ that span the range against
# the same variable-rate encoder distilled from the same classification teacher alone, each with the
# classification head trained with it (their detection and segmentation heads follow below).
for lmbda in ${SPAN_LMBDAS//,/ }; do rac 8 "$lmbda" joint; done
rac_vr 8 "$VR_LMBDAS"
# What distilling three teachers buys (the multi-task Δ, issue 21 §3), and layout (b): detection and
# segmentation heads on the frozen classification trunk of the three-teacher and of the
# classification-only encoder.
shared_heads "$W/rac8-vr-mt"
shared_heads "$W/rac8-vr"
# the same heads on each single-rate bundle: the variable-rate cost on detection and segmentation
# (issue 24: heads that serve every rate against heads trained for one)
for lmbda in ${SPAN_LMBDAS//,/ }; do shared_heads "$W/rac8-l$lmbda"; done
# The other layouts: (a) by our one-stage recipe against the reference's, (c) with narrow heads from
# scratch against (c) from the teachers' heads.
own_heads "$W/rac8-vr-mt" direct
joint_trunk "$W/rac8-vr-mt" "$W/rac8-vr-mt-joint" cls,det,seg "${NARROW[@]}"
# The shipped default before v2 (single-rate, trained on v1's 15 backgrounds), from git history: the
# sweep's "before" row, measured on v2's two vals like every other point.
test -d "$W/default-v1" || { mkdir -p "$W/default-v1.tmp" && git -C "$R/.." archive 25a7192 \
  platform/splitserve/assets/default-bundle | tar -x -C "$W/default-v1.tmp" --strip-components=4 \
  && mv "$W/default-v1.tmp" "$W/default-v1"; }
# 2. The other curves: Entropic Student at four rates (classification), the learned image codecs;
#    the rate model (one shared prior against one prior per rate, rac8-vr).
for beta in 0.32 0.16 0.08 0.02; do es "$beta"; done
for q in 1 2 3 5; do image_codec bmshj2018-factorized "$q"; done
for q in 1 2 3 5; do image_codec mbt2018-mean "$q"; done
rac_vr 8 "$VR_LMBDAS" "" shared
[ "$WHAT" = extra ] || { echo "study runs done in $W"; exit 0; }
# 3. Extras (fmnist_scenes_runs.sh WORKDIR extra, after the study): the other three λ alone (~40 min
#    each here: the four that span the range decide the comparison); the same comparisons on Entropic
#    Student (distilled from the classification teacher alone against all three, heads on the frozen
#    shared trunk, own trunks, joint trunk), and RAC N = 0.
for lmbda in ${VR_LMBDAS//,/ }; do rac 8 "$lmbda" joint; done
for beta in 0.32 0.08; do es "$beta" "" multi; shared_heads "$W/es-b$beta"; shared_heads "$W/es-b$beta-mt"; done
own_heads "$W/es-b0.32" teacher
own_heads "$W/es-b0.32" direct
own_heads "$W/es-b0.32-mt" teacher
joint_trunk "$W/es-b0.32-mt" "$W/es-b0.32-mt-joint" cls,det,seg "${NARROW[@]}"
for lmbda in 1.92 0.96 0.64 0.48; do rac 0 "$lmbda" joint; done
echo "study and extra runs done in $W"
