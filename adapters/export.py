"""Export a committed adapter version for use outside seal.

- ``export_adapter``: a standard PEFT adapter directory (``adapter_model.safetensors``
  and ``adapter_config.json``, whose ``base_model_name_or_path`` names the base model
  folder) that ``PeftModel.from_pretrained(base, dir)`` loads, plus ``seal.json``
  saying where it came from (id, parent, sha256). The weights are copied byte for byte
  and their sha256 is checked against the store's before anything is written.
- ``export_merged``: a full Hugging Face model directory (weights and tokenizer) with
  the adapter merged into the base (peft's ``merge_and_unload``), loadable with
  ``AutoModelForCausalLM.from_pretrained(dir)`` and no peft at all.

Both write into a temp dir beside the destination and rename it into place, so a
crash or an error leaves no half-written export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from . import files
from .lora import AdapterError

log = logging.getLogger(__name__)

PROVENANCE = "seal.json"


def _target(dest: Path) -> Path:
    """The destination must not exist, or be an empty folder (replaced)."""
    dest = Path(dest)
    if dest.exists():
        if not dest.is_dir():
            raise AdapterError(f"{dest} exists and is not a folder")
        if any(dest.iterdir()):
            raise AdapterError(f"{dest} exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def _place(tmp: Path, dest: Path) -> None:
    if dest.exists():  # an empty folder: rename() cannot replace it on every platform
        dest.rmdir()
    os.rename(tmp, dest)


def export_adapter(src: Path, dest: Path, *, sha256: str, base_model: str | None, provenance: dict) -> Path:
    """Copy the adapter folder ``src`` to ``dest`` as a standard PEFT adapter directory
    whose config names ``base_model``; refuses if the weights' sha256 differs from
    ``sha256`` (the store's). Returns ``dest``."""
    src, dest = Path(src), _target(Path(dest))
    try:
        weights = (src / files.WEIGHTS_NAME).read_bytes()
        config = json.loads((src / files.CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read the adapter in {src}: {e}") from None
    digest = hashlib.sha256(weights).hexdigest()
    if digest != sha256:
        raise AdapterError(f"{src / files.WEIGHTS_NAME}: sha256 {digest[:12]}… does not match the store's {sha256[:12]}…")
    if base_model:
        config["base_model_name_or_path"] = str(base_model)
    config["inference_mode"] = True
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=dest.parent))
    try:
        (tmp / files.WEIGHTS_NAME).write_bytes(weights)
        (tmp / files.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / PROVENANCE).write_text(json.dumps({**provenance, "sha256": digest}, indent=2), encoding="utf-8")
        _place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", provenance.get("id"), dest)
    return dest


def export_merged(src: Path, dest: Path, *, sha256: str, base_model: str | Path, provenance: dict,
                  dtype: str = "auto") -> Path:
    """Load the base model folder ``base_model``, apply the adapter in ``src`` with
    peft, merge it into the weights and save a full HF model directory (weights,
    config, tokenizer) at ``dest``. Returns ``dest``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dest = Path(src), _target(Path(dest))
    digest = hashlib.sha256((src / files.WEIGHTS_NAME).read_bytes()).hexdigest()
    if digest != sha256:
        raise AdapterError(f"{src / files.WEIGHTS_NAME}: sha256 {digest[:12]}… does not match the store's {sha256[:12]}…")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own status
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto" and dtype not in names:
        raise AdapterError(f"unknown dtype {dtype!r} (auto, {', '.join(names)})")
    tok = AutoTokenizer.from_pretrained(str(base_model))
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype="auto" if dtype == "auto" else names[dtype])
    merged = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=dest.parent))
    try:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps({**provenance, "sha256": digest, "merged": True,
                                                  "base_model": str(base_model)}, indent=2), encoding="utf-8")
        _place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s merged into %s to %s", provenance.get("id"), base_model, dest)
    return dest
