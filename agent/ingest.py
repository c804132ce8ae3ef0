"""Ingestion: read documents, split them into passages, hand them to the store.

The path a document takes (``prepare``): collect and read the files and parse them
into documents (``agent.documents``: every check a user's file needs), split long
text into passages that fit the token budget (``Chunker``), and attach the
``--questions`` file's pairs to the passages that contain their answers
(``AnswerIndex``). All of it happens before the store is touched, so bad input
changes nothing; the caller then makes one ``Store.ingest`` call (one transaction).

Every user-facing failure is an ``IngestError`` whose message is one line.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from policies.reward import normalize
from store import NewDocument, NewQuestion

from .documents import (
    KINDS,
    STDIN,
    Document,
    IngestError,
    QuestionLine,
    collect,
    decode,
    parse_json,
    parse_jsonl,
    parse_text,
    question_lines,
    read_file,
    read_stream,
    short_text,
)
from .runtime import ModelConfig, load_tokenizer


@dataclass(frozen=True)
class IngestConfig:
    # 1024, not less: whole SQuAD passages (up to ~770 tokens) stay one passage each,
    # as SEAL trains on them, and a passage plus a self-edit still fits a short context.
    max_passage_tokens: int = field(
        default=1024, metadata={"help": "split documents into passages of at most this many tokens, on paragraph boundaries"}
    )
    max_document_bytes: int = field(
        default=16_000_000, metadata={"help": "documents larger than this are refused (0 = no limit)"}
    )

    def __post_init__(self) -> None:
        if self.max_passage_tokens < 16:
            raise ValueError("max_passage_tokens must be at least 16")
        if self.max_document_bytes < 0:
            raise ValueError("max_document_bytes must be 0 (no limit) or more")


# ------------------------------------------------------------------------- chunking
class Chunker:
    """Splits text into passages of at most ``budget`` tokens of ``tokenizer``.

    Passages break on paragraph boundaries (blank lines); a paragraph over the budget
    breaks on sentence ends, and a sentence over it between words. Each passage is a
    contiguous slice of the text, so nothing is lost or reordered; a single word over the
    budget is cut inside (``_cut``), so no passage is ever over it.
    """

    def __init__(self, tokenizer, budget: int):
        self.tokenizer = tokenizer
        self.budget = budget

    def counts(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: skip transformers' per-text Python work
            return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def count(self, text: str) -> int:
        return self.counts([text])[0]

    def surely_too_long(self, text: str) -> bool:
        """Too long to need counting: no tokenizer packs 32 characters into a token."""
        return len(text) > 32 * self.budget

    def split(self, text: str, n_tokens: int | None = None) -> list[tuple[str, int]]:
        """``[(passage, n_tokens), ...]`` for already normalised ``text``."""
        text = text.strip()
        if n_tokens is None and not self.surely_too_long(text):
            n_tokens = self.count(text)
        if n_tokens is not None and n_tokens <= self.budget:
            return [(text, n_tokens)]
        paragraphs = [m.span() for m in re.finditer(r"\S(?:[^\n]|\n(?!\n))*", text)]
        units: list[tuple[int, int, int]] = []
        for (s, e), c in zip(paragraphs, self.counts([text[s:e] for s, e in paragraphs]), strict=True):
            units.extend([(s, e, c)] if c <= self.budget else self._split_paragraph(text, s, e))
        return [(text[s:e], c) for s, e, c in self._pack(text, units)]

    def _split_paragraph(self, text: str, start: int, end: int) -> list[tuple[int, int, int]]:
        sentences, s = [], start
        for m in re.finditer(r"(?<=[.!?…])[\"'”’)\]]*\s+", text[start:end]):
            sentences.append((s, start + m.start() + len(m.group().rstrip())))
            s = start + m.end()
        sentences.append((s, end))
        units: list[tuple[int, int, int]] = []
        for (s, e), c in zip(sentences, self.counts([text[s:e] for s, e in sentences]), strict=True):
            if c <= self.budget:
                units.append((s, e, c))
            else:
                words = [(s + m.start(), s + m.end()) for m in re.finditer(r"\S+", text[s:e])]
                counts = self.counts([text[a:b] for a, b in words])
                pieces = [u for (a, b), c in zip(words, counts, strict=True) for u in self._cut(text, a, b, c)]
                units.extend(self._pack(text, pieces))
        return self._pack(text, units)

    def _cut(self, text: str, start: int, end: int, n: int) -> list[tuple[int, int, int]]:
        """A word over the budget (a 200 KB string with no space) is cut into pieces of
        equal length that fit; any other unit is returned as it is."""
        if n <= self.budget or end - start < 2:
            return [(start, end, n)]
        k = 2 * -(-n // self.budget)  # twice the pieces the count says: tokens are uneven
        size = -(-(end - start) // k)
        spans = [(a, min(a + size, end)) for a in range(start, end, size)]
        out = []
        for (a, b), c in zip(spans, self.counts([text[a:b] for a, b in spans]), strict=True):
            out.extend(self._cut(text, a, b, c))
        return out

    def _pack(self, text: str, units: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Greedily merge consecutive units while they fit. The sum of the units' counts
        only estimates the count of their joined text, so each group is counted exactly
        and shrunk until it fits (a single unit always stands alone)."""
        out, i = [], 0
        while i < len(units):
            j, estimate = i + 1, units[i][2]
            while j < len(units) and estimate + 1 + units[j][2] <= self.budget:
                estimate += 1 + units[j][2]
                j += 1
            n = units[i][2]
            while j - i > 1 and (n := self.count(text[units[i][0] : units[j - 1][1]])) > self.budget:
                j -= 1
            out.append((units[i][0], units[j - 1][1], n if j - i > 1 else units[i][2]))
            i = j
        return out


# ------------------------------------------------------------------ answer matching
class AnswerIndex:
    """Finds the first of many texts whose normalised words contain an answer's, fast
    enough for thousands of answers over thousands of passages: the normalised texts
    are joined into one string and located with ``str.find`` and a bisect.

    The normalisation is grading's (``policies.reward.normalize``), so a text that
    grading would count as containing the answer is found; when none is, a second
    pass with punctuation turned into spaces finds ``Levi`` in ``Levi's Stadium``."""

    def __init__(self, texts: Sequence[str]):
        self.variants = []
        for punct in ("", " "):
            parts = [f" {normalize(t, punct)} " for t in texts]
            starts, pos = [], 0
            for part in parts:
                starts.append(pos)
                pos += len(part) + 1
            self.variants.append((punct, "\0".join(parts), starts))

    def find(self, answer: str) -> int | None:
        for punct, haystack, starts in self.variants:
            needle = normalize(answer, punct)
            if needle:
                at = haystack.find(f" {needle} ")
                if at >= 0:
                    return bisect_right(starts, at) - 1
        return None


def attach_questions(docs: list[Document], lines: list[QuestionLine], source: str) -> None:
    """Give each --questions pair to the first passage that contains its answer
    (among passages with its title, when it names one)."""
    flat = [(d, i) for d in docs for i in range(len(d.passages))]
    everything = AnswerIndex([d.passages[i][1] for d, i in flat])
    by_title: dict[str, tuple[list, AnswerIndex]] = {}
    for q in lines:
        index, pool = everything, flat
        if q.title is not None:
            key = q.title.casefold()
            if key not in by_title:
                pool = [(d, i) for d, i in flat if key in (d.title.casefold(), d.passages[i][0].casefold())]
                if not pool:
                    raise IngestError(f"{source} line {q.line}: no ingested document is titled {q.title!r}")
                by_title[key] = (pool, AnswerIndex([d.passages[i][1] for d, i in pool]))
            pool, index = by_title[key]
        hit = index.find(q.answer)
        if hit is None:
            where = f" titled {q.title!r}" if q.title is not None else ""
            raise IngestError(f"{source} line {q.line}: answer {short_text(q.answer)!r} is not in any ingested passage{where}")
        d, i = pool[hit]
        d.passages[i][3].append(NewQuestion(q.question, q.answer))


# ----------------------------------------------------------------------------- flow
def chunk(docs: list[Document], chunker: Chunker) -> None:
    """Split every record into passages; a chunked record's questions go to the chunk
    that contains their answer, else to its first chunk."""
    # One batched count for every record of ordinary size: most fit as they are.
    records = [r for d in docs for r in d.records if not chunker.surely_too_long(r.text)]
    counts = dict(zip(map(id, records), chunker.counts([r.text for r in records]), strict=True))
    for d in docs:
        d.passages = []
        for r in d.records:
            pieces = chunker.split(r.text, counts.get(id(r)))
            per_piece: list[list[NewQuestion]] = [[] for _ in pieces]
            index = AnswerIndex([t for t, _ in pieces]) if len(pieces) > 1 else None
            for q in r.questions:
                hit = index.find(q.answer) if index else 0
                per_piece[hit or 0].append(q)
            d.passages.extend((r.title, t, n, qs) for (t, n), qs in zip(pieces, per_piece, strict=True))


def prepare(
    paths: Sequence[str],
    *,
    cfg: IngestConfig,
    model: ModelConfig,
    title: str | None = None,
    questions: str | None = None,
    stdin: Callable[[], BinaryIO] | None = None,
    tokenizer=None,
) -> list[NewDocument]:
    """Read, validate, parse, chunk and attach questions to everything named by
    ``paths``; raises IngestError (one line) on the first bad input. Touches no store."""
    title = _title(title)
    sources, qfile = read_sources(paths, cfg=cfg, stdin=stdin, questions=questions)
    docs = [parse(name, _kind(name), raw, size, title) for name, raw, size in sources]
    return _finish(docs, qfile, cfg,
                   tokenizer if tokenizer is not None else load_tokenizer(model))


def read_sources(paths: Sequence[str], *, cfg: IngestConfig, stdin: Callable[[], BinaryIO] | None = None,
                 questions: str | None = None) -> tuple[list[tuple[str, str, int]], tuple[str, str] | None]:
    """What ``prepare`` reads, before parsing: (name, text, bytes) of every document
    named by ``paths`` (stdin as "-"), and (name, text) of the --questions file. `seal
    ingest` beside a daemon sends this to its API, which does the rest
    (``prepare_sources``)."""
    docs = []
    for source in collect(paths):
        if source == STDIN:
            if stdin is None:
                raise IngestError("- (stdin) is not available here")
            docs.append((STDIN, *read_stream(stdin(), cfg.max_document_bytes)))
        else:
            docs.append((source, *read_file(source, cfg.max_document_bytes)))
    if questions is None:
        return docs, None
    p = Path(questions)
    if not p.is_file():
        raise IngestError(f"{questions}: no such file" if not p.exists() else f"{questions}: not a file")
    return docs, (questions, read_file(questions, cfg.max_document_bytes)[0])


def prepare_sources(sources: Sequence[tuple[str, bytes]], *, cfg: IngestConfig, tokenizer, title: str | None = None,
                    questions: tuple[str, bytes] | None = None) -> list[NewDocument]:
    """Documents given as (name, bytes) rather than paths (``POST /v1/documents``):
    the name's extension says the kind (.txt, .md, .json, .jsonl; none, or "-": text),
    and from decoding on every check, the parsing, the chunking and the --questions
    pairs are ``prepare``'s. Raises IngestError (one line); touches no store."""
    title = _title(title)
    if not sources:
        raise IngestError("no document given")
    docs = []
    for name, data in sources:
        name = name.strip() or "upload.txt"
        suffix = "" if name == STDIN else Path(name).suffix.lower()
        if suffix and suffix not in KINDS:
            raise IngestError(f"{name}: unsupported file type '{suffix}' (supported: .txt, .md, .json, .jsonl)")
        docs.append(parse(name, _kind(name), decode(name, data, cfg.max_document_bytes), len(data), title))
    qfile = None
    if questions is not None:
        qfile = (questions[0], decode(questions[0], questions[1], cfg.max_document_bytes))
    return _finish(docs, qfile, cfg, tokenizer)


def _title(title: str | None) -> str | None:
    if title is not None and not title.strip():
        raise IngestError("--title is empty")
    return " ".join(title.split()) if title else None


def _kind(name: str) -> str:
    return "txt" if name == STDIN else KINDS.get(Path(name).suffix.lower(), "txt")


def _finish(docs: list[Document], questions: tuple[str, str] | None, cfg: IngestConfig, tokenizer) -> list[NewDocument]:
    """Chunk the parsed documents and attach the --questions file's pairs (its name, its text)."""
    lines = question_lines(*questions) if questions else []
    chunk(docs, Chunker(tokenizer, cfg.max_passage_tokens))
    if lines:
        attach_questions(docs, lines, questions[0])
    return [d.to_new() for d in docs]


def parse(source: str, kind: str, raw: str, size: int, title: str | None) -> Document:
    """One document's text, parsed as its kind says (txt, md, json, jsonl)."""
    if kind == "json":
        return parse_json(source, raw, size, title)
    if kind == "jsonl":
        return parse_jsonl(source, raw, size, title)
    return parse_text(source, kind, raw, size, title)


def outcome_rows(docs: list[NewDocument], outcomes: list) -> list[dict]:
    """What ``Store.ingest`` did with each document, as `seal ingest` reports it and the
    API returns it: new or duplicate, passages and questions added, known or dropped."""
    return [{"status": "new" if o.status == "new" and o.passages_added else "duplicate", "source": o.source,
             "title": d.title, "passages": o.passages_added, "passages_known": o.passages_duplicate,
             "questions": o.questions_added, "questions_dropped": o.questions_dropped,
             "questions_offered": sum(len(p.questions) for p in d.passages), "duplicate_of": o.duplicate_of}
            for d, o in zip(docs, outcomes, strict=True)]
