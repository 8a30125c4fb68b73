#!/usr/bin/env bash
# The LR range test alone (lr_find.enabled=true, one training step after it, no test) for
# the demo's full fine-tuning and LoRA runs; each run's suggestion is in its log line,
# result.json (lr_found) and lr_find.png.
#
#   bash experiments/lr_find/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${BIN:-.venv/bin}
lock=()
[ -e /tmp/heavy.lock ] && lock=(flock /tmp/heavy.lock)
for lora in none qv all_linear; do
    OMP_WAIT_POLICY=PASSIVE "${lock[@]}" "$bin/lora-lightning" experiment=full_vs_lora \
        name=lr_find lora=$lora lr_find.enabled=true trainer.max_steps=1 test=false \
        trainer.enable_progress_bar=false
done
