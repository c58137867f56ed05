"""The settings `specprobe tune` chose for a model on this machine, saved and read back.

A saved choice changes the options a run uses (ESP's mask init, masks and branching for `esp` and
`hybrid`, wherever the caller gives none), unlike the measured caches beside it (kernel plans,
cost curves), which only change speed. It lives under `settings_root()`: `$SPECPROBE_SETTINGS`,
default `cache_root()/tuned`; the test suite points `$SPECPROBE_SETTINGS` at a folder of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .store import atomic_write, cache_root, file_name

TUNED_METHODS = ("esp", "hybrid")
TUNED_KEYS = ("mask_init", "masks", "branching")


def model_key(model) -> str:
    if hasattr(model, "tuned_key"):  # a llama.cpp model names itself
        return model.tuned_key
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings().weight
    key = f"{cfg.model_type}-{cfg.num_hidden_layers}x{cfg.hidden_size}-v{head.shape[0]}-{head.dtype}-{head.device.type}"
    return file_name(key)


def settings_root() -> Path:
    """Where tuned choices live: `$SPECPROBE_SETTINGS`, else `cache_root()/tuned`."""
    return Path(os.environ["SPECPROBE_SETTINGS"]) if os.environ.get("SPECPROBE_SETTINGS") else cache_root() / "tuned"


def settings_path(model) -> Path:
    return settings_root() / f"{model_key(model)}.json"


def tuned_options(model, method: str) -> dict:
    """The saved settings for `method` on this model ({} when none were saved, or unreadable)."""
    if method not in TUNED_METHODS:
        return {}
    path = settings_path(model)
    if not path.is_file():
        return {}
    try:
        chosen = json.loads(path.read_text())["chosen"]
        return {k: chosen[k] for k in TUNED_KEYS if k in chosen}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def save_choice(model, record: dict) -> Path:
    """Save `record` ({"chosen": {...}, ...}) as this model's tuned choice, atomically."""
    path = settings_path(model)
    atomic_write(path, json.dumps(record, indent=1))
    return path
