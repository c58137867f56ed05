"""specprobe inside other engines: `vllm` holds its drafters as a vLLM speculative proposer."""
