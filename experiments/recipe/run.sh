#!/usr/bin/env bash
# The shipped recipe (experiment=full_vs_lora) on two sets it was never tuned on, as a user
# runs it with data=text_files: full fine-tuning and LoRA all-linear (lora=all_linear_r64,
# the sweep's LoRA all-linear run), seeds 0 to 4 (SEEDS="0 1 2" for the issue's three).
#
#   bash experiments/recipe/run.sh            # then: bash experiments/recipe/run.sh report
#
# Each job is its own command (under `flock /tmp/heavy.lock` when that lock file exists, so
# other jobs on a shared machine interleave); one command per set does the same:
#   lora-lightning experiment=full_vs_lora data=text_files data.train=.../train.csv \
#       data.test=.../test.csv seed=0,1,2,3,4 'hydra.sweeper.params.lora=none,all_linear_r64'
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${BIN:-.venv/bin}
data=outputs/recipe_data
if [ "${1:-}" = report ]; then
    for set in tweets speeches; do
        "$bin/python" -m lora_lightning.app.report "outputs/recipe_$set" \
            --out "experiments/recipe/$set" --title "$set: full fine-tuning vs LoRA all-linear r=64"
    done
    "$bin/python" experiments/recipe/gaps.py tweets=outputs/recipe_tweets speeches=outputs/recipe_speeches \
        > experiments/recipe/gaps.md
    exit 0
fi
[ -f "$data/tweets/train.csv" ] || "$bin/python" experiments/recipe/prepare_data.py --out "$data"
lock=()
[ -e /tmp/heavy.lock ] && lock=(flock /tmp/heavy.lock)
for seed in ${SEEDS:-0 1 2 3 4}; do
    for set in tweets speeches; do
        for lora in none all_linear_r64; do
            run=$([ $lora = none ] && echo full_ft || echo lora_all_linear_r64)
            if grep -qs "\"seed\": $seed," outputs/recipe_$set/*/*_$run/result.json; then
                continue  # done already (a rerun resumes)
            fi
            OMP_WAIT_POLICY=PASSIVE "${lock[@]}" "$bin/lora-lightning" experiment=full_vs_lora \
                name=recipe_$set data=text_files data.train=$data/$set/train.csv \
                data.test=$data/$set/test.csv lora=$lora seed=$seed \
                trainer.enable_progress_bar=false
        done
    done
done
