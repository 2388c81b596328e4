# Shared by the tiny recipe scripts (examples/*/tiny_synthetic.sh), which source it after setting
# OUT (run folder), CONF (the recipe's conf folder), DATA (corpus) and USER_DIR, and declaring
# `declare -A MINUTES` (minutes per stage, for their results table).

stage() {  # stage NAME DONE_FILE COMMAND...: run COMMAND (log OUT/NAME.log) unless DONE_FILE exists
    local name=$1 done_file=$2
    shift 2
    if [[ -e $done_file ]]; then
        echo "[$name] done before: $done_file"
        MINUTES[$name]="-"
        return
    fi
    echo "[$name] $* > $OUT/$name.log"
    local started=$SECONDS
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        tail -n 30 "$OUT/$name.log"
        echo "[$name] failed: the whole log is $OUT/$name.log" >&2
        exit 1
    fi
    MINUTES[$name]=$(awk -v s=$((SECONDS - started)) 'BEGIN { printf "%.1f", s / 60 }')
    echo "[$name] ${MINUTES[$name]} min"
}

train() {  # train GROUP SAVE_DIR OVERRIDES...: fairseq-hydra-train on CONF/GROUP/tiny_synthetic.yaml
    local group=$1 save_dir=$2
    shift 2
    fairseq-hydra-train --config-dir "$CONF/$group" --config-name tiny_synthetic \
        task.data="$DATA" common.user_dir="$USER_DIR" checkpoint.save_dir="$save_dir" \
        hydra.run.dir="$save_dir/hydra" "$@"
}
