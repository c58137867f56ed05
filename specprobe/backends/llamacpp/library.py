"""llama-cpp-python's low-level bindings, imported once, with its logging silenced.

The backend uses only llama.cpp's C API through `llama_cpp` (ctypes): model and context, batches
of token ids or of embedding rows with per-row sequence sets, the memory (KV cache) operations on
sequences, and the logits of the rows asked for. The package is an optional dependency
(`pip install "specprobe[llamacpp]"`, built from source by pip).
"""

from __future__ import annotations

import ctypes
import functools

from ...errors import InvalidOptionError

INSTALL = 'pip install "specprobe[llamacpp]" (builds llama-cpp-python from source; scripts/install.sh does it)'


@functools.lru_cache(maxsize=1)
def llama():
    """The `llama_cpp` module, its backend initialised and its log output silenced (errors reach
    the caller as return codes, which the backend turns into exceptions)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise InvalidOptionError(f"the llamacpp backend needs llama-cpp-python ({e}): {INSTALL}") from None
    llama_cpp.llama_backend_init()
    callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp._specprobe_log_callback = callback  # keep the C callback alive with the module
    return llama_cpp


def available() -> bool:
    try:
        llama()
        return True
    except InvalidOptionError:
        return False


def system_info() -> str:
    """llama.cpp's build flags as it prints them ("AVX2 = 1 | LLAMAFILE = 1 | ...")."""
    return llama().llama_print_system_info().decode(errors="replace")


def batch_invariant_build() -> bool:
    """Whether this build computes a row's logits independently of how many rows share its batch.

    llama.cpp's llamafile kernels (LLAMAFILE = 1) take over matrix products of several rows for
    some weight types (Q4_0, Q5_0, Q8_0, ...) with another summation order than the one-row path:
    a verification forward then gives slightly different logits than plain decoding (up to about 1
    logit on Gemma3-270M's Q4_K_M file, measured), so outputs can part at near-ties. A build with
    -DGGML_LLAMAFILE=OFF (what scripts/install.sh makes) has no such path."""
    return "LLAMAFILE = 1" not in system_info()
