"""Data files shipped inside the package, found next to this module (so that the path
does not depend on where the code that reads them lives)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def default_squad_path() -> Path:
    """The SQuAD v1.1 dev passages with their questions in SEAL's format, gzip-compressed
    (the default benchmark data; licence and changes in ``data/SQUAD_LICENSE.md``)."""
    return DATA / "squad_dev.json.gz"


def data_id(path: Path) -> str:
    """How a benchmark records its data file: the file's name (without ``.gz``) and the
    sha256 of its content (decompressed), so a result, a resume or a saved editor
    matches the same passages wherever the file lives, compressed or not."""
    import gzip
    import hashlib

    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return f"{path.name.removesuffix('.gz')} sha256:{hashlib.sha256(raw).hexdigest()[:16]}"
