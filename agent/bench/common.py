"""What the benchmarks share: the SQuAD-format data (``load_squad``), the seeded draw of
passages from a split (``draw``, ``split_of``), bootstrap intervals, and the library
versions a result records.

Passages are split by title into a *tune* split (crc32(title) % 5 == 0) and an *eval*
split. Benchmarks draw from the eval split by default; anything tuned (prompts,
margins, hyper-parameters) is tuned on the tune split only.
"""

from __future__ import annotations

import gzip
import json
import platform
import random
import zlib
from pathlib import Path

from ..datasets import default_squad_path

DEFAULT_DATA = default_squad_path()  # SQuAD v1.1 dev passages shipped with the package
DEFAULT_POLICIES = ("implications", "rewrite", "self_qa", "qa_chat")


def split_of(title: str) -> str:
    return "tune" if zlib.crc32(title.encode("utf-8")) % 5 == 0 else "eval"


def load_squad(path: Path) -> list[dict]:
    """Passages with their questions from a SEAL-format JSON list or the official SQuAD
    layout; a file whose name ends in ``.gz`` is read gzip-compressed."""
    raw = Path(path).read_bytes()
    if Path(path).name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except EOFError as e:  # cut short: say so as the other bad-file errors do
            raise ValueError(f"truncated gzip data ({e})") from e
    data = json.loads(raw.decode("utf-8"))
    if isinstance(data, dict) and "data" in data:  # official SQuAD layout
        data = [
            {"title": a["title"], "context": p["context"],
             "questions": [{"question": q["question"], "answer": q["answers"][0]["text"]} for q in p["qas"]]}
            for a in data["data"] for p in a["paragraphs"]
        ]
    return data


def draw(data: list[dict], n: int, seed: int, split: str, min_questions: int = 3) -> list[dict]:
    pool = [d for d in data if len(d.get("questions", [])) >= min_questions
            and (split == "all" or split_of(d["title"]) == split)]
    rng = random.Random(seed)
    return rng.sample(pool, min(n, len(pool)))


def bootstrap_ci(values: list[float], seed: int = 0, n: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads()}
