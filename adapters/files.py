"""Adapter files: a standard PEFT adapter directory (``adapter_model.safetensors``
and ``adapter_config.json``), written atomically and read back with its sha256
checked, so ``PeftModel.from_pretrained(base, dir)`` loads what seal saved."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .lora import AdapterError, restore, snapshot

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _config_json(peft_model, adapter: str) -> bytes:
    """adapter_config.json as ``PeftModel.from_pretrained`` expects it for a fresh base."""
    pc = copy.deepcopy(peft_model.peft_config[adapter])
    pc.inference_mode = True
    if pc.base_model_name_or_path is None:
        pc.base_model_name_or_path = getattr(peft_model.get_base_model(), "name_or_path", None) or None
    d = pc.to_dict()
    for k, v in d.items():
        if isinstance(v, set):
            d[k] = sorted(v)  # sorted: the same adapter always writes the same bytes
    return json.dumps(d, indent=2, sort_keys=True, default=str).encode()


def encode(peft_model, adapter: str) -> tuple[bytes, bytes, str]:
    """The adapter's two files as bytes (adapter_model.safetensors, adapter_config.json)
    and the sha256 of the weights: what ``save`` writes."""
    from safetensors.torch import save as st_save

    weights = st_save(snapshot(peft_model, adapter), metadata={"format": "pt"})
    return weights, _config_json(peft_model, adapter), hashlib.sha256(weights).hexdigest()


def save(peft_model, adapter: str, dest: Path) -> str:
    """Write the adapter as a standard PEFT directory at ``dest`` (which must not
    exist), atomically: temp dir beside it, fsync, rename, fsync the parent. Returns
    the sha256 of adapter_model.safetensors."""
    return write(Path(dest), *encode(peft_model, adapter))


def write(dest: Path, weights: bytes, config: bytes, sha256: str) -> str:
    """``save``'s atomic write of already encoded files (``encode``); returns ``sha256``."""
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        _write(tmp / WEIGHTS_NAME, weights)
        _write(tmp / CONFIG_NAME, config)
        _fsync_dir(tmp)
        if dest.exists():  # rename() would silently replace an empty directory
            raise FileExistsError(f"{dest} already exists")
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sha256


def load(peft_model, adapter: str, src: Path, expected_sha256: str | None = None) -> None:
    """Load a saved adapter directory into the named adapter (safetensors only). The
    file's hash is checked before anything is loaded, from the same bytes."""
    from safetensors.torch import load as st_load

    src = Path(src)
    if adapter not in peft_model.peft_config:
        raise AdapterError(f"no adapter named {adapter!r}")
    try:
        data = (src / WEIGHTS_NAME).read_bytes()
    except OSError as e:
        raise AdapterError(f"cannot read {src / WEIGHTS_NAME}: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise AdapterError(f"{src / WEIGHTS_NAME}: sha256 {digest[:12]}… does not match the expected {expected_sha256[:12]}…")
    try:
        saved = json.loads((src / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {src / CONFIG_NAME}: {e}") from None
    have = peft_model.peft_config[adapter]
    if (
        saved.get("peft_type") != "LORA"
        or saved.get("r") != have.r
        or saved.get("lora_alpha") != have.lora_alpha
        or set(saved.get("target_modules") or ()) != set(have.target_modules)
    ):
        raise AdapterError(
            f"{src}: a LoRA of rank {saved.get('r')}, alpha {saved.get('lora_alpha')} does not fit adapter "
            f"{adapter!r} (rank {have.r}, alpha {have.lora_alpha}) or its targets differ"
        )
    try:
        state = st_load(data)
    except Exception as e:
        raise AdapterError(f"{src / WEIGHTS_NAME} is not a valid safetensors file: {e}") from None
    restore(peft_model, adapter, state)
