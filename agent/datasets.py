"""Data files shipped inside the package, found next to this module (so that the path
does not depend on where the code that reads them lives)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def default_squad_path() -> Path:
    """The SQuAD v1.1 dev passages with their questions in SEAL's format, gzip-compressed
    (the default benchmark data; licence and changes in ``data/SQUAD_LICENSE.md``)."""
    return DATA / "squad_dev.json.gz"
