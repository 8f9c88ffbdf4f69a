#!/usr/bin/env bash
# capture -> compensated plan -> apply, on the real MobileNetV2 (README example); run from an
# empty directory: bash benchmarks/fidelity/demo/run.sh (writes calib.safetensors, manifest.json,
# plan.json and plan.fold.safetensors there)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# the scripts import the benchmarks package from the repository root
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
CKPT="${PRUNEGRAPH_REALDATA:-$HOME/.cache/prunegraph-realdata}/mobilenet_v2_imagenet.pth"
echo '$ python capture.py'; python "$HERE/capture.py"
echo '$ prunegraph plan mobilenet_v2_imagenet.pth --manifest manifest.json --activations calib.safetensors --target-flops 0.1 --allocation uniform -o plan.json'
prunegraph plan "$CKPT" --manifest manifest.json --activations calib.safetensors --target-flops 0.1 --allocation uniform -o plan.json
echo '$ python apply.py'; python "$HERE/apply.py"
