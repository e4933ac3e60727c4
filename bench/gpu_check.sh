#!/usr/bin/env bash
# The GPU check of issue 12 item 5 (bench/gpu_check.py): the three services
# with --device cuda --dtype bfloat16 on a GPT-2-medium-shaped random model,
# and again with --cudnn-attention, ~7 minutes, results in $OUT (gpu_check.json, gpu_check.txt, gpu_check.log,
# nvidia-smi.txt). Extra arguments go to bench.gpu_check (--seconds, --only ...).
#
# On the device machine (python3 there has torch 2.11, transformers 5.17,
# rich, numpy...; both versions work): carry `arbiter/v1` (the generated
# protobuf code is git-ignored) and `.whl`, the wheels `make gpu-wheels`
# downloads here (what that image lacks or has at other versions):
#   run(command="bash bench/gpu_check.sh", carry=["arbiter/v1", ".whl"], timeout_s=540)
#   run(command="bash bench/gpu_check.sh profile", carry=[...], timeout_s=240)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Fail in seconds, not after building models, when an import is missing.
# (river: the reward service's drift monitor, imported when a version loads.)
python3 -c "import services.reward.server, services.reference.server, services.policy.server, river.drift" 2>&1 \
    | tee "$OUT/gpu_check.log" || exit 1
# `gpu_check.sh profile ...`: where the time goes (bench/gpu_profile.py) instead.
module=bench.gpu_check
if [ "${1:-}" = profile ]; then module=bench.gpu_profile; shift; fi
timeout "${GPU_CHECK_TIMEOUT_S:-500}" python3 -m $module --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
