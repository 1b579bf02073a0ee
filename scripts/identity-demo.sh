#!/usr/bin/env bash
# The identity fine-tune shown in the README: LoRA on the default 0.5B model with the model
# card's identity data, timed, then asked who it is (greedy decoding).
#   bash scripts/identity-demo.sh [OUT]      # default OUT: runs/identity-lora
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/identity-lora}
qwenlm=.venv/bin/qwenlm
echo "machine load before: $(uptime)"
start=$(date +%s)
"$qwenlm" train recipes/identity-lora.yaml --out "$out"
end=$(date +%s)
echo "training (model load included) took $((end - start)) s"
echo "machine load after: $(uptime)"
for q in "你是谁" "Who are you?" "1+1等于几？"; do
  echo "> $q"
  "$qwenlm" generate --adapter "$out" --greedy "$q"
done
echo "> 你是谁   (qwenlm chat)"
printf '你是谁\n/exit\n' | "$qwenlm" chat --adapter "$out" --greedy
