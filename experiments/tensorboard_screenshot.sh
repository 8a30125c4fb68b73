#!/usr/bin/env bash
# Screenshots of TensorBoard's Custom Scalars (smoothing 0, as the app's printed URL opens
# it), Text (the final values) and HParams tabs for a finished run or sweep, taken with
# headless Chromium (not a dependency of the package; Debian: apt-get install chromium):
#
#   bash experiments/tensorboard_screenshot.sh LOGDIR OUT_PREFIX [PORT]
#
# writes OUT_PREFIX_custom_scalars.png, OUT_PREFIX_final_values.png and
# OUT_PREFIX_hparams.png. LOGDIR goes to
# TensorBoard's --logdir_spec, so several sweeps can be shown under names of your own:
# full:outputs/full_split/<date>_<time>/tensorboard,lora:outputs/...
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 LOGDIR OUT_PREFIX [PORT]  (LOGDIR: a run's or sweep's tensorboard folder)" >&2
    exit 2
fi
logdir=$1 out=$2 port=${3:-6123}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "no Chromium found on PATH (tried chromium, chromium-browser, google-chrome); install one." >&2
    exit 2
fi
tensorboard=$(dirname "$0")/../.venv/bin/tensorboard
[ -x "$tensorboard" ] || tensorboard=tensorboard
"$tensorboard" --logdir_spec "$logdir" --port "$port" >/dev/null 2>&1 &
tb=$!
trap 'kill $tb' EXIT
for _ in $(seq 60); do curl -sf "localhost:$port/data/runs" >/dev/null && break; sleep 1; done
sleep 5   # let TensorBoard read the event files
shot() {  # tab, height, file
    "$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
        --window-size=1600,"$2" --virtual-time-budget=15000 \
        --screenshot="$3" "http://127.0.0.1:$port/#$1" 2>/dev/null
}
shot "custom_scalars&_smoothingWeight=0" 1100 "${out}_custom_scalars.png"
shot text 700 "${out}_final_values.png"
shot hparams 700 "${out}_hparams.png"
echo "wrote ${out}_custom_scalars.png ${out}_final_values.png ${out}_hparams.png"
