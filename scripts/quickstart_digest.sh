#!/usr/bin/env bash
# The quickstart's stage-I and stage-II weights, digested (issue 15: bit-identical before and
# after a refactor). Runs README's quickstart commands in a fresh folder with fewer steps (the
# full quickstart is ~40 min on an idle 2-core CPU) and prints scripts/weights_digest.py's lines.
#   scripts/quickstart_digest.sh [WORKDIR] [FINETUNE_STEPS] [COMBINER_STEPS]
#   CIR_CODE=/path/to/other/checkout scripts/quickstart_digest.sh ...   # that tree's cir_cli
# Compare the printed sha256 columns with a run of the same command on the other commit.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
finetune_steps="${2:-20}"
combiner_steps="${3:-100}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CIR_PROGRESS=0 PYTHONHASHSEED=0 OMP_NUM_THREADS=1
code="${CIR_CODE:-$repo}"
export PYTHONPATH="$code${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$work" && cd "$work" && rm -rf data runs
cir prepare toy --out data/toy >/dev/null
cir finetune --recipe toy_clip4cir --set "finetune.max_steps=$finetune_steps" >/dev/null
cir train-combiner --recipe toy_clip4cir --set finetune.checkpoint=latest \
  --set "combiner.max_steps=$combiner_steps" >/dev/null
python "$repo/scripts/weights_digest.py" runs --json "$work/digest.json"
