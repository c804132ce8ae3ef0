"""Ingestion: read documents, split them into passages, hand them to the store.

The path a document takes (``prepare``): collect the files (a folder is walked),
read each one with every check a user's file needs (exists, supported, not too big,
not empty, not binary, UTF-8), parse it (plain text, or SEAL/SQuAD-style JSON/JSONL
records with their questions), split long text into passages that fit the token
budget, and attach the ``--questions`` file's pairs to the passages that contain
their answers. All of it happens before the store is touched, so bad input changes
nothing; the caller then makes one ``Store.ingest`` call (one transaction).

Every user-facing failure is an ``IngestError`` whose message is one line.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from policies.reward import normalize
from store import NewDocument, NewPassage, NewQuestion

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


class IngestError(ValueError):
    """Bad input: the message is one line, fit for the user."""


KINDS = {".txt": "txt", ".md": "md", ".markdown": "md", ".json": "json", ".jsonl": "jsonl"}
STDIN = "-"


# ------------------------------------------------------------------------ text helpers
def normalize_text(text: str) -> str:
    """What is stored: NFC, Unix newlines, no trailing spaces, at most one blank line
    between paragraphs, no surrounding whitespace."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(text: str) -> str:
    """Of the words only: the same text re-wrapped or re-indented is the same content."""
    return sha256(" ".join(text.split()))


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


_HEADING = re.compile(r"#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")


def split_heading(text: str) -> tuple[str | None, str]:
    """A leading Markdown heading (``# Title``) and the text after it."""
    first, _, rest = text.partition("\n")
    m = _HEADING.fullmatch(first.strip())
    if not m:
        return None, text
    return m.group(1).strip(), rest.strip()


# ------------------------------------------------------------------------- chunking
class Chunker:
    """Splits text into passages of at most ``budget`` tokens of ``tokenizer``.

    Passages break on paragraph boundaries (blank lines); a paragraph over the budget
    breaks on sentence ends, and a sentence over it between words. Each passage is a
    contiguous slice of the text, so nothing is lost or reordered; only a single word
    longer than the budget can overflow it (there is nowhere to cut).
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
                units.extend(self._pack(text, [(a, b, c) for (a, b), c in zip(words, counts, strict=True)]))
        return self._pack(text, units)

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


# --------------------------------------------------------------------- parsed input
@dataclass
class Record:
    """A document's text before chunking: one record of a JSON/JSONL file, or the
    whole of a text file."""

    title: str
    text: str
    questions: list[NewQuestion] = field(default_factory=list)


@dataclass
class Document:
    """A parsed input, validated but not yet stored."""

    source: str
    kind: str
    title: str
    bytes: int
    sha256: str
    records: list[Record]
    # filled by ``chunk``, in order: (title, text, n_tokens, questions) per passage
    passages: list[tuple[str, str, int, list[NewQuestion]]] = field(default_factory=list)

    def to_new(self) -> NewDocument:
        return NewDocument(
            source=self.source,
            title=self.title,
            kind=self.kind,
            sha256=self.sha256,
            bytes=self.bytes,
            passages=tuple(
                NewPassage(title=t, text=x, sha256=sha256(x), n_tokens=n, questions=tuple(qs))
                for t, x, n, qs in self.passages
            ),
        )


@dataclass(frozen=True)
class QuestionLine:
    line: int
    question: str
    answer: str
    title: str | None


# -------------------------------------------------------------------------- reading
def collect(paths: Sequence[str]) -> list[str]:
    """The files to read, in order: each argument, a folder's documents walked
    recursively (sorted, hidden files and folders skipped), ``-`` for stdin."""
    if not paths:
        raise IngestError("nothing to ingest: give files, a folder, or - for stdin")
    out: list[str] = []
    for arg in paths:
        if arg == STDIN:
            if STDIN in out:
                raise IngestError("- (stdin) is given twice")
            out.append(STDIN)
            continue
        p = Path(arg)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in KINDS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and f.is_file()
            )
            if not found:
                raise IngestError(f"{arg}: no {', '.join(sorted(set(KINDS) - {'.markdown'}))} files in this folder")
            out.extend(str(f) for f in found)
        elif p.exists():
            if p.suffix.lower() not in KINDS:
                what = f"'{p.suffix}'" if p.suffix else "(no extension)"
                raise IngestError(f"{arg}: unsupported file type {what} (supported: .txt, .md, .json, .jsonl)")
            out.append(arg)
        else:
            raise IngestError(f"{arg}: no such file or folder")
    return out


def _decode(source: str, data: bytes, limit: int) -> str:
    if limit and len(data) > limit:
        raise IngestError(f"{source}: {len(data):,} bytes, over the limit ingest.max_document_bytes = {limit:,}")
    if b"\0" in data:
        raise IngestError(f"{source}: a binary file (it contains NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError(f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise IngestError(f"{source}: the file is empty" if source != STDIN else "stdin is empty")
    return text


def read_file(source: str, limit: int) -> tuple[str, int]:
    """The text of a file and its size in bytes, or an IngestError."""
    p = Path(source)
    try:
        size = p.stat().st_size
        if limit and size > limit:  # refuse before reading a huge file into memory
            raise IngestError(f"{source}: {size:,} bytes, over the limit ingest.max_document_bytes = {limit:,}")
        data = p.read_bytes()
    except OSError as e:
        raise IngestError(f"{source}: cannot read ({e.strerror or e})") from None
    return _decode(source, data, limit), len(data)


def read_stream(stream: BinaryIO, limit: int) -> tuple[str, int]:
    data = stream.read(limit + 1) if limit else stream.read()
    return _decode(STDIN, data, limit), len(data)


# -------------------------------------------------------------------------- parsing
def parse_text(source: str, kind: str, raw: str, size: int, title: str | None) -> Document:
    """A .txt/.md file or stdin: one record; title from --title, else a leading
    Markdown heading (which then leaves the text), else the file name."""
    text = normalize_text(raw)
    heading, body = split_heading(text)
    if title is None and heading is not None:
        title, text = heading, body
        if not text:
            raise IngestError(f"{source}: there is no text after the title '{_short(heading)}'")
    if title is None:
        title = "stdin" if source == STDIN else Path(source).stem
    return Document(source, kind, title, size, content_hash(normalize_text(raw)), [Record(title, text)])


def _questions(where: str, value: object) -> list[NewQuestion]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise IngestError(f'{where}: "questions" must be a list of {{"question": ..., "answer": ...}}')
    out = []
    for i, q in enumerate(value, 1):
        if not (isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)):
            raise IngestError(f'{where}: question {i} needs "question" and "answer" strings')
        if not q["question"].strip() or not q["answer"].strip():
            raise IngestError(f"{where}: question {i} has an empty question or answer")
        out.append(NewQuestion(" ".join(q["question"].split()), " ".join(q["answer"].split())))
    return out


def _record(where: str, obj: object, default_title: str) -> Record:
    if not isinstance(obj, dict):
        raise IngestError(f'{where}: expected an object with "context" (and "title", "questions"), got {type(obj).__name__}')
    context = obj.get("context")
    if not isinstance(context, str) or not context.strip():
        raise IngestError(f'{where}: no "context" text')
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        raise IngestError(f'{where}: "title" must be a string')
    title = " ".join(title.split()) if title and title.strip() else default_title
    return Record(title, normalize_text(context), _questions(where, obj.get("questions")))


def _squad_v1(source: str, data: dict, default_title: str) -> list[Record]:
    """The official SQuAD layout: {"data": [{"title", "paragraphs": [{"context", "qas"}]}]}."""
    records = []
    for a, article in enumerate(data["data"], 1):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise IngestError(f'{source}: data[{a}] has no "paragraphs" list')
        for p, par in enumerate(paragraphs, 1):
            where = f"{source}: data[{a}].paragraphs[{p}]"
            qas = []
            for qa in (par.get("qas") or []) if isinstance(par, dict) else []:
                answers = qa.get("answers") if isinstance(qa, dict) else None
                if isinstance(answers, list) and answers and isinstance(answers[0], dict):
                    qas.append({"question": qa.get("question"), "answer": answers[0].get("text")})
            title = article.get("title") or default_title
            records.append(_record(where, {**(par if isinstance(par, dict) else {}), "title": title, "questions": qas}, default_title))
    return records


def parse_json(source: str, raw: str, size: int, title: str | None) -> Document:
    stem = "stdin" if source == STDIN else Path(source).stem
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise IngestError(f"{source}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    default = title or stem
    if isinstance(data, dict) and "context" not in data and isinstance(data.get("data"), list):
        records = _squad_v1(source, data, default)
        doc_title = title or stem
    elif isinstance(data, dict):
        records = [_record(source, data, default)]
        doc_title = title or records[0].title
    elif isinstance(data, list):
        records = [_record(f"{source}: record {i}", obj, default) for i, obj in enumerate(data, 1)]
        doc_title = title or (records[0].title if len({r.title for r in records}) == 1 else stem)
    else:
        raise IngestError(f"{source}: expected a JSON object or a list of objects, got {type(data).__name__}")
    if not records:
        raise IngestError(f"{source}: no records")
    return Document(source, "json", doc_title, size, _records_hash(records), records)


def parse_jsonl(source: str, raw: str, size: int, title: str | None) -> Document:
    default = title or Path(source).stem
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(f"{source} line {n}: malformed JSON at column {e.colno}: {e.msg}") from None
        records.append(_record(f"{source} line {n}", obj, default))
    return Document(source, "jsonl", default, size, _records_hash(records), records)


def _records_hash(records: list[Record]) -> str:
    """Of the canonical records, so that the same data as .json or .jsonl, pretty or
    compact, in any key order, is one document."""
    canon = [[r.title, " ".join(r.text.split()), [[q.question, q.answer] for q in r.questions]] for r in records]
    return sha256(json.dumps(canon, ensure_ascii=False, separators=(",", ":")))


def parse_questions(source: str, limit: int) -> list[QuestionLine]:
    """A --questions file: JSONL lines of {"question", "answer"[, "title"]}."""
    p = Path(source)
    if not p.is_file():
        raise IngestError(f"{source}: no such file" if not p.exists() else f"{source}: not a file")
    raw, _ = read_file(source, limit)
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise IngestError(f'{where}: expected an object {{"question": ..., "answer": ...}}')
        q, a, t = obj.get("question"), obj.get("answer"), obj.get("title")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise IngestError(f'{where}: needs non-empty "question" and "answer" strings')
        if t is not None and (not isinstance(t, str) or not t.strip()):
            raise IngestError(f'{where}: "title" must be a non-empty string')
        if not normalize(a) and not normalize(a, " "):
            raise IngestError(f"{where}: answer {a!r} has no words to look for")
        out.append(QuestionLine(n, " ".join(q.split()), " ".join(a.split()), " ".join(t.split()) if t else None))
    if not out:
        raise IngestError(f"{source}: no questions in the file")
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
            raise IngestError(f"{source} line {q.line}: answer {_short(q.answer)!r} is not in any ingested passage{where}")
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
    if title is not None and not title.strip():
        raise IngestError("--title is empty")
    title = " ".join(title.split()) if title else None
    docs: list[Document] = []
    for source in collect(paths):
        if source == STDIN:
            if stdin is None:
                raise IngestError("- (stdin) is not available here")
            raw, size = read_stream(stdin(), cfg.max_document_bytes)
            docs.append(parse_text(STDIN, "txt", raw, size, title))
            continue
        raw, size = read_file(source, cfg.max_document_bytes)
        kind = KINDS[Path(source).suffix.lower()]
        if kind == "json":
            docs.append(parse_json(source, raw, size, title))
        elif kind == "jsonl":
            docs.append(parse_jsonl(source, raw, size, title))
        else:
            docs.append(parse_text(source, kind, raw, size, title))
    lines = parse_questions(questions, cfg.max_document_bytes) if questions else []
    chunk(docs, Chunker(tokenizer if tokenizer is not None else load_tokenizer(model), cfg.max_passage_tokens))
    if lines:
        attach_questions(docs, lines, questions)  # type: ignore[arg-type]
    return [d.to_new() for d in docs]
