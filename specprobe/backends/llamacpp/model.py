"""A GGUF file loaded on llama.cpp: the object `specprobe.load(name, backend="llamacpp").model` is.

It owns llama.cpp's model and one context (its KV cache: every generation on this model is a
sequence in it; with `streams` > 1, a stream of its own, for generations served side by side) and knows what the engine asks of a model: its vocabulary, context length, the
tokens that end a generation (llama.cpp's end-of-generation set), and its input-embedding table,
de-quantised from the GGUF file with `gguf` when first needed (ESP's mask rows and lookahead's
window rows are embedding rows). Gemma-family models scale token embeddings by sqrt(n_embd)
inside llama.cpp for token input only, so the table here carries that scale: an embedding row
then means exactly what a token row means.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ...errors import InvalidOptionError, ModelNotFoundError
from .gguf_tensor import read_tensor
from .library import llama

DEFAULT_CONTEXT = 4096  # tokens a generation may hold (prompt + output), unless the model's own is smaller
TREE_HEADROOM = 1024  # KV cells beyond the context for the rows of a verification forward (and a second cache)
N_BATCH = 512  # llama.cpp's (and llama-cpp-python's) default batch: prompts are decoded in chunks of this
N_SEQ_MAX = 256  # sequences per context: llama.cpp's limit
STREAM_HEADROOM = 256  # KV cells per stream beyond the context (a stream's rows never pass the context: the loop drops drafts first)


@dataclass(frozen=True)
class LlamaCppSettings:
    context: int = DEFAULT_CONTEXT
    threads: int | None = None  # default: torch's thread count (the same as the torch backend's)
    gpu_layers: int = 999  # layers offloaded where the build has a GPU backend (CUDA, Metal); ignored on a CPU build
    extra_bufts: bool = False  # llama.cpp's weight repacking (faster kernels for some types; off: rows stay batch-invariant)
    flash_attention: bool = False  # llama.cpp's default (its CPU kernel's sums differ with the batch)
    kv_float32: bool = False  # llama.cpp's default float16 KV cache (float32: another numerical path, not llama.cpp's)
    streams: int = 1  # >1: that many generations at once, each in a KV store of its own (batched serving; see below)


class LlamaCppModel:
    """A GGUF model on llama.cpp, with one context."""

    def __init__(self, path: str | Path, settings: LlamaCppSettings | None = None):
        L = llama()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {path}")
        self.settings = settings or LlamaCppSettings()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = self.settings.gpu_layers
        mp.use_extra_bufts = self.settings.extra_bufts
        self._model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise ModelNotFoundError(f"llama.cpp could not load {self.path}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.vocab_size = int(L.llama_vocab_n_tokens(self._vocab))
        self.hidden_size = int(L.llama_model_n_embd(self._model))
        self.n_layer = int(L.llama_model_n_layer(self._model))
        self.architecture = self._meta("general.architecture") or "unknown"
        trained = int(L.llama_model_n_ctx_train(self._model)) or DEFAULT_CONTEXT
        self.max_length = min(trained, self.settings.context)
        self.threads = self.settings.threads or torch.get_num_threads() or os.cpu_count() or 1
        if self.settings.streams < 1 or self.settings.streams > N_SEQ_MAX:
            raise InvalidOptionError(f"streams must be in 1..{N_SEQ_MAX}, got {self.settings.streams}")
        self.streams = self.settings.streams
        cp = L.llama_context_default_params()
        if self.streams == 1:
            cp.n_ctx = self.max_length + TREE_HEADROOM
            cp.n_seq_max = N_SEQ_MAX
            cp.kv_unified = True  # one cell store: copying a sequence copies no data (tree branches, mask rows)
        else:
            # one KV store per stream (llama.cpp's non-unified cache, as its server's slots): a
            # generation's cells then sit where they would sit if it ran alone, whatever the other
            # streams hold, so its logits are bit-identical to running alone (a shared store
            # interleaves the generations' cells, which changes the attention sums' order)
            cp.n_ctx = self.streams * (self.max_length + STREAM_HEADROOM)
            cp.n_seq_max = self.streams
            cp.kv_unified = False
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_BATCH
        cp.swa_full = True  # sliding-window layers keep every cell: rejected rows are removed, never evicted
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.settings.flash_attention else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if self.settings.kv_float32:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        cp.no_perf = True
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            L.llama_model_free(self._model)
            raise InvalidOptionError(f"llama.cpp could not make a context of {cp.n_ctx} tokens for {self.path.name}")
        self.memory = L.llama_get_memory(self._ctx)
        eog = [t for t in range(self.vocab_size) if L.llama_vocab_is_eog(self._vocab, t)]
        self.generation_config = SimpleNamespace(eos_token_id=eog)  # what api.eos_token_ids reads
        self.tuned_key = f"llamacpp-{self.architecture}-{self.n_layer}x{self.hidden_size}-v{self.vocab_size}"
        self._embeddings: torch.Tensor | None = None
        self._backend = None  # its LlamaCppBackend (backend.py: LlamaCppBackend.of), which owns the batches

    def _meta(self, key: str) -> str | None:
        L = llama()
        buf = bytes(256)
        n = L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf[:n].decode(errors="replace") if n > 0 else None

    @property
    def context(self):
        return self._ctx

    def embeddings(self) -> torch.Tensor:
        """The input embedding of every token, as llama.cpp feeds it to the first layer: [vocab, hidden]."""
        if self._embeddings is None:
            table = read_tensor(self.path, "token_embd.weight")
            if table is None:
                raise InvalidOptionError(f"{self.path.name} has no token_embd.weight: embedding rows need it")
            table = np.ascontiguousarray(table.reshape(self.vocab_size, self.hidden_size), dtype=np.float32)
            if self.architecture.startswith("gemma"):
                table *= np.float32(math.sqrt(self.hidden_size))  # as llama.cpp scales token input
            self._embeddings = torch.from_numpy(table)
        return self._embeddings

    def close(self) -> None:
        L = llama()
        if getattr(self, "_backend", None) is not None:
            self._backend.close()
            self._backend = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the process frees it anyway
            pass

    def __repr__(self) -> str:
        return f"LlamaCppModel({self.path.name}, {self.architecture}, context {self.max_length}, {self.threads} threads)"
