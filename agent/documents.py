"""Reading what a user hands to ``seal ingest``: the files to read (a folder is
walked), each one read with every check a user's file needs (exists, supported, not
too big, not empty, not binary, UTF-8), parsed (plain text, or SEAL/SQuAD-style
JSON/JSONL records with their questions) into a ``Document``, and the
``--questions`` file's lines. Nothing here counts tokens or touches the store.

Every user-facing failure is an ``IngestError`` whose message is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from policies.reward import normalize
from store import NewDocument, NewPassage, NewQuestion


class IngestError(ValueError):
    """Bad input: the message is one line, fit for the user."""


KINDS = {".txt": "txt", ".md": "md", ".markdown": "md", ".json": "json", ".jsonl": "jsonl"}
STDIN = "-"


# ------------------------------------------------------------------------ text helpers
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # controls but \t \n \r; lone surrogates


def clean(text: str) -> str:
    """Without control characters (but tabs and newlines) and lone surrogates (which a
    JSON "\\ud800" escape can carry, and which UTF-8 cannot store)."""
    return _UNPRINTABLE.sub("", text)


def one_line(text: str) -> str:
    """A title, question or answer: cleaned, its whitespace runs made single spaces."""
    return " ".join(clean(text).split())


def normalize_text(text: str) -> str:
    """What is stored: no control characters, NFC, Unix newlines, no trailing spaces,
    at most one blank line between paragraphs, no surrounding whitespace."""
    text = unicodedata.normalize("NFC", clean(text.replace("\r\n", "\n").replace("\r", "\n")))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(text: str) -> str:
    """Of the words only: the same text re-wrapped or re-indented is the same content."""
    return sha256(" ".join(text.split()))


def short_text(s: str, n: int = 60) -> str:
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


def decode(source: str, data: bytes, limit: int) -> str:
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
    try:  # non-blocking: opening a FIFO must not wait for a writer
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise IngestError(f"{source}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO, a device (a link to /dev/zero), a socket
            raise IngestError(f"{source}: not a regular file ({_kind(st.st_mode)}): seal reads documents only")
        if limit and st.st_size > limit:  # refuse before reading a huge file into memory
            raise IngestError(f"{source}: {st.st_size:,} bytes, over the limit ingest.max_document_bytes = {limit:,}")
        chunks, got, cap = [], 0, (limit + 1 if limit else None)  # a file that grows: never more than limit + 1
        while cap is None or got < cap:
            b = os.read(fd, 1 << 20 if cap is None else min(1 << 20, cap - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        data = b"".join(chunks)
    except OSError as e:
        raise IngestError(f"{source}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    return decode(source, data, limit), len(data)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def read_stream(stream: BinaryIO, limit: int) -> tuple[str, int]:
    data = stream.read(limit + 1) if limit else stream.read()
    return decode(STDIN, data, limit), len(data)


# -------------------------------------------------------------------------- parsing
def parse_text(source: str, kind: str, raw: str, size: int, title: str | None) -> Document:
    """A .txt/.md file or stdin: one record; title from --title, else a leading
    Markdown heading (which then leaves the text), else the file name."""
    text = normalize_text(raw)
    heading, body = split_heading(text)
    if title is None and heading is not None:
        title, text = heading, body
        if not text:
            raise IngestError(f"{source}: there is no text after the title '{short_text(heading)}'")
    if all(_HEADING.fullmatch(line.strip()) for line in text.split("\n") if line.strip()):
        raise IngestError(f"{source}: only headings, no text to learn")
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
        if not one_line(q["question"]) or not one_line(q["answer"]):
            raise IngestError(f"{where}: question {i} has an empty question or answer")
        out.append(NewQuestion(one_line(q["question"]), one_line(q["answer"])))
    return out


def _record(where: str, obj: object, default_title: str) -> Record:
    if not isinstance(obj, dict):
        raise IngestError(f'{where}: expected an object with "context" (and "title", "questions"), got {type(obj).__name__}')
    context = obj.get("context")
    text = normalize_text(context) if isinstance(context, str) else ""
    if not text:
        raise IngestError(f'{where}: no "context" text')
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        raise IngestError(f'{where}: "title" must be a string')
    title = one_line(title) if title and one_line(title) else default_title
    return Record(title, text, _questions(where, obj.get("questions")))


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
    except RecursionError:
        raise IngestError(f"{source}: JSON nested too deeply") from None
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
        except RecursionError:
            raise IngestError(f"{source} line {n}: JSON nested too deeply") from None
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
    return question_lines(source, raw)


def question_lines(source: str, raw: str) -> list[QuestionLine]:
    """The questions of a --questions file's text (``source`` names it in errors)."""
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise IngestError(f"{where}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise IngestError(f'{where}: expected an object {{"question": ..., "answer": ...}}')
        q, a, t = obj.get("question"), obj.get("answer"), obj.get("title")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise IngestError(f'{where}: needs non-empty "question" and "answer" strings')
        if t is not None and (not isinstance(t, str) or not t.strip()):
            raise IngestError(f'{where}: "title" must be a non-empty string')
        if not normalize(a) and not normalize(a, " "):
            raise IngestError(f"{where}: answer {a!r} has no words to look for")
        if not one_line(q) or not one_line(a) or (t is not None and not one_line(t)):
            raise IngestError(f"{where}: a question, answer or title is only control characters")
        out.append(QuestionLine(n, one_line(q), one_line(a), one_line(t) if t else None))
    if not out:
        raise IngestError(f"{source}: no questions in the file")
    return out
