#!/usr/bin/env bash
# Synchformer's tiny recipes end to end on a synthetic corpus, on a CPU:
#   1. corpus     avplugins-synth speech (9-11 s clips) or sparse (10 s scenes with rare events),
#                 600 clips at 48 px: 390 train, 60 valid, 150 test
#   2. offsets    python -m preprocess.sync_offsets: the fixed valid/test offsets, seeded
#   3. decode     python -m preprocess.cache_sync_features decode: every clip decoded once
#   4. stage1     pretrain/tiny_synthetic.yaml (segment-level InfoNCE, 1500 updates)
#   5. features   python -m preprocess.cache_sync_features features: the frozen towers' outputs
#   6. stage2     sync/tiny_synthetic.yaml on the cached features (aligned init, 1000 updates)
#   7. test       fairseq-validate on the 150 test clips at their fixed offsets, decoded from the
#                 videos (towers and sync module end to end), best and last checkpoints
# A stage whose output exists is skipped, so a second run only tests again. The times and the
# accuracy table go to OUT/results.md. About 7 minutes of training on 2 cores (README, Synchformer).
#
#   examples/synchformer/tiny_synthetic.sh [speech|sparse] [OUT]      (default: speech runs/synchformer_tiny_speech)
#   CPU=""  (empty) lets fairseq use a GPU when there is one
set -euo pipefail

KIND=${1:-speech}
[[ $KIND == speech || $KIND == sparse ]] || { echo "corpus kind must be speech or sparse, got '$KIND'" >&2; exit 2; }
OUT=$(mkdir -p "${2:-runs/synchformer_tiny_$KIND}" && cd "${2:-runs/synchformer_tiny_$KIND}" && pwd)
CONF=$(cd "$(dirname "$0")/conf" && pwd)
USER_DIR=$(python -m avplugins --user-dir 2>/dev/null)
DATA=$OUT/data
CPU=${CPU---cpu}
DEVICE=$([[ -n $CPU ]] && echo cpu || echo auto)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
RESULTS=$OUT/results.md
declare -A MINUTES

source "$(dirname "$0")/../recipe_stages.sh"

test_accuracy() {  # test_accuracy CHECKPOINT: "acc@1 | +-1 | acc@5" (%) on the test set
    local log="$OUT/test_$(basename "$1" .pt).log"
    fairseq-validate "$DATA" --user-dir "$USER_DIR" $CPU --task av_sync --path "$1" --valid-subset test \
        --batch-size 16 --model-overrides "{'feature_cache': None}" > "$log" 2>&1
    awk '/valid on .test. subset/ {
        for (i = 1; i <= NF; i++) { if ($i == "accuracy_1") a = $(i + 1); if ($i == "accuracy_1_tol") t = $(i + 1); if ($i == "accuracy_5") f = $(i + 1) }
        printf "%.1f | %.1f | %.1f", 100 * a, 100 * t, 100 * f }' "$log"
}

stage corpus "$DATA/corpus.json" avplugins-synth "$KIND" --out "$DATA" --num-clips 600 --seed 0 \
    --image-size 48 --valid-fraction 0.1 --test-fraction 0.25 \
    $([[ $KIND == speech ]] && echo --min-duration 9 --max-duration 11)
stage offsets "$DATA/test_offsets.csv" python -m preprocess.sync_offsets "$DATA" --splits valid test --seed 0
stage decode "$OUT/decoded/decoded.json" python -m preprocess.cache_sync_features decode "$DATA" "$OUT/decoded" \
    --splits train valid --resize-short-side 48
stage stage1 "$OUT/stage1/checkpoint_last.pt" train pretrain "$OUT/stage1" common.log_format=json \
    task.decoded_clips="$OUT/decoded"
stage features "$OUT/features/meta.json" python -m preprocess.cache_sync_features features \
    "$OUT/stage1/checkpoint_last.pt" "$DATA" "$OUT/features" --splits train valid --decoded "$OUT/decoded" \
    --device "$DEVICE"
stage stage2 "$OUT/stage2/checkpoint_last.pt" train sync "$OUT/stage2" common.log_format=json \
    task.feature_cache="$OUT/features" \
    model.pretrained_towers="$OUT/stage1/checkpoint_last.pt"

echo "[test] fairseq-validate on the $(($(wc -l < "$DATA/test.tsv") - 1)) test clips"
{
    echo "| $KIND test set (fixed offsets) | acc@1 (%) | acc@1 +-1 class (%) | acc@5 (%) |"
    echo "|---|---|---|---|"
    echo "| stage 2, best checkpoint (valid accuracy@1) | $(test_accuracy "$OUT/stage2/checkpoint_best.pt") |"
    echo "| stage 2, last checkpoint | $(test_accuracy "$OUT/stage2/checkpoint_last.pt") |"
    echo "| chance | 4.8 | 13.8 | 23.8 |"
    echo
    echo "stage 2 training accuracy@1 over the first and the last $(awk -F'"' '/train_inner/ { for (i = 1; i < NF; i++) if ($i == "num_updates") { print $(i + 2); exit } }' "$OUT/stage2.log") updates: $(awk -F'"' '/train_inner/ {
        for (i = 1; i < NF; i++) { if ($i == "accuracy_1") a = $(i + 2); if ($i == "loss") l = $(i + 2) }
        if (!seen++) { a0 = a; l0 = l } }
        END { printf "%.3f -> %.3f (loss %s -> %s)", a0, a, l0, l }' "$OUT/stage2.log")"
    echo "stage 1 segment retrieval accuracy (valid, last): $(awk -F'"' '/\[valid\]/ { for (i = 1; i < NF; i++) if ($i == "valid_accuracy") a = $(i + 2) } END { print a }' "$OUT/stage1.log")"
    echo "minutes: corpus ${MINUTES[corpus]}, decode ${MINUTES[decode]}, stage 1 ${MINUTES[stage1]}, features ${MINUTES[features]}, stage 2 ${MINUTES[stage2]}"
} > "$RESULTS"
cat "$RESULTS"
