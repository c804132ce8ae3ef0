"""Ingestion: read documents, split them into passages, hand them to the store."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class IngestConfig:
    max_passage_tokens: int = field(
        default=384, metadata={"help": "split documents into passages of at most this many tokens, on paragraph boundaries"}
    )
    max_document_bytes: int = field(
        default=16_000_000, metadata={"help": "documents larger than this are refused (0 = no limit)"}
    )
