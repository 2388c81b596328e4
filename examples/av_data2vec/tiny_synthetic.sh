#!/usr/bin/env bash
# AV-data2vec's tiny recipes end to end on the synthetic speech corpus, on a CPU:
#   1. corpus       avplugins-synth speech, 8000 utterances of 2-4 s (7800 train, 100 valid, 100 test)
#   2. pretrain     pretrain/tiny_synthetic.yaml (300 updates)
#   3. asr          finetune/tiny_synthetic.yaml on audio alone, no noise (3000 updates), from 2
#   4. vsr, avsr    from the ASR model of 3 (checkpoint.finetune_from_model), 1500 updates each,
#                   side by side with one thread each: vsr on video alone; avsr on audio+video
#                   (no modality dropout) with babble on half the utterances
#   5. decode       fairseq-generate, beam 5: ASR (model 3), VSR (model 4 vsr) and AVSR (model 4
#                   avsr), clean and with 3-voice babble at 0 dB SNR
# A stage whose output exists is skipped, so a second run only decodes again. The times and the
# WER table go to OUT/results.md. About 22 minutes of training on 2 cores (README, AV-data2vec).
#
#   examples/av_data2vec/tiny_synthetic.sh [OUT]        (default runs/av_data2vec_tiny)
#   CPU=""  (empty) lets fairseq use a GPU when there is one
set -euo pipefail

OUT=$(mkdir -p "${1:-runs/av_data2vec_tiny}" && cd "${1:-runs/av_data2vec_tiny}" && pwd)
CONF=$(cd "$(dirname "$0")/conf" && pwd)
USER_DIR=$(python -m avplugins --user-dir 2>/dev/null)
DATA=$OUT/data
CPU=${CPU---cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
RESULTS=$OUT/results.md
declare -A MINUTES

source "$(dirname "$0")/../recipe_stages.sh"

wer() {  # wer CHECKPOINT MODALITIES SNR(clean|dB): prints the WER of the test set
    local noise=() log="$OUT/decode_$(basename "$(dirname "$1")")_${2/,/+}_$3.log"
    [[ $3 == clean ]] || noise=(--noise-manifest "$DATA/train.tsv" --noise-snr-db "$3" --noise-babble-voices 3)
    fairseq-generate "$DATA" --user-dir "$USER_DIR" $CPU --task av_speech_recognition --path "$1" \
        --gen-subset test --modalities "$2" --image-size 32 --crop-size 28 --beam 5 --batch-size 16 \
        --max-len-a 0.2 --max-len-b 5 --scoring wer --post-process sentencepiece "${noise[@]}" > "$log" 2>&1
    grep -o "WER: [0-9.]*" "$log" | tail -n 1 | cut -d" " -f2
}

stage corpus "$DATA/corpus.json" avplugins-synth speech --out "$DATA" --num-clips 8000 --seed 0 \
    --image-size 32 --valid-fraction 0.0125 --test-fraction 0.0125
stage pretrain "$OUT/pretrain/checkpoint_last.pt" train pretrain "$OUT/pretrain"
stage asr "$OUT/asr/checkpoint_last.pt" train finetune "$OUT/asr" \
    task.modalities=audio task.noise_manifest=null optimization.max_update=3000 \
    model.w2v_path="$OUT/pretrain/checkpoint_last.pt"
# the two last fine-tunes are independent: side by side, one thread each (a tiny model gains
# nothing from a second thread, so the pair takes about the wall time of one)
[[ -e $OUT/vsr/checkpoint_last.pt && -e $OUT/avsr/checkpoint_last.pt ]] && MINUTES[vsr+avsr]="-"
started=$SECONDS
OMP_NUM_THREADS=1 stage vsr "$OUT/vsr/checkpoint_last.pt" train finetune "$OUT/vsr" \
    task.modalities=video task.noise_manifest=null \
    model.w2v_path=null checkpoint.finetune_from_model="$OUT/asr/checkpoint_last.pt" &
vsr_stage=$!
OMP_NUM_THREADS=1 stage avsr "$OUT/avsr/checkpoint_last.pt" train finetune "$OUT/avsr" \
    model.finetune_p_av=1.0 \
    model.w2v_path=null checkpoint.finetune_from_model="$OUT/asr/checkpoint_last.pt" &
avsr_stage=$!
failed=0
wait $vsr_stage || failed=1
wait $avsr_stage || failed=1  # both waited for: a failure of one leaves no orphan behind
(( failed == 0 )) || exit 1
[[ -n ${MINUTES[vsr+avsr]:-} ]] || MINUTES[vsr+avsr]=$(awk -v s=$((SECONDS - started)) 'BEGIN { printf "%.1f", s / 60 }')

echo "[decode] beam 5 on the $(($(wc -l < "$DATA/test.tsv") - 1)) test utterances"
{
    echo "| system | model | clean WER (%) | 0 dB babble WER (%) |"
    echo "|---|---|---|---|"
    echo "| ASR | asr | $(wer "$OUT/asr/checkpoint_last.pt" audio clean) | $(wer "$OUT/asr/checkpoint_last.pt" audio 0) |"
    echo "| VSR | vsr | $(wer "$OUT/vsr/checkpoint_last.pt" video clean) | - |"
    echo "| AVSR | avsr | $(wer "$OUT/avsr/checkpoint_last.pt" audio,video clean) | $(wer "$OUT/avsr/checkpoint_last.pt" audio,video 0) |"
    echo
    echo "pre-training: $(awk -F'[=,]' '/train_inner/ {
        for (i = 1; i < NF; i++) { if ($i ~ / loss$/) loss = $(i + 1); if ($i ~ /target_var$/) var = $(i + 1) }
        if (!seen++) { loss0 = loss; var0 = var; low = var } if (var < low) low = var }
        END { printf "regression loss %s -> %s, target variance %s -> %s (lowest %s)", loss0, loss, var0, var, low }' \
        "$OUT/pretrain.log")"
    echo "minutes: corpus ${MINUTES[corpus]}, pretrain ${MINUTES[pretrain]}, asr ${MINUTES[asr]}, vsr+avsr side by side ${MINUTES[vsr+avsr]}"
} > "$RESULTS"
cat "$RESULTS"
