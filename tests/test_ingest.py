"""`seal ingest`: formats, chunking, questions, duplicates, bad input, durability."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bench.common import DEFAULT_DATA, load_squad, split_of
from agent.documents import normalize_text
from agent.ingest import AnswerIndex, Chunker
from policies.reward import is_correct, normalize
from store import Store
from tests.helpers import SQUAD


@pytest.fixture(autouse=True)
def _session_tokenizer(monkeypatch, tokenizer):
    """Every CLI call would load the tokenizer again (seconds on a busy 2-core box):
    hand it the session's instead. ``load_tokenizer`` itself is what built it."""
    monkeypatch.setattr("agent.ingest.load_tokenizer", lambda model_cfg: tokenizer)


def store(home: Path) -> Store:
    return Store(home / "store.db")


def counts(home: Path) -> dict[str, int] | None:
    if not (home / "store.db").exists():
        return None
    with store(home) as s:
        return s.counts()


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


VELMOOR = """# Velmoor

Velmoor is a lakeside town on the northern shore of Lake Quillon. About 2,300 people live there.

The town was founded in 1642 by a rope maker named Oda Feverell.
"""


def squad_records(n: int | None = None) -> list[dict]:
    return json.loads(SQUAD.read_text(encoding="utf-8"))[:n]


# ----------------------------------------------------------------------- text files
def test_markdown_title_from_heading_and_body_without_it(seal, home, tmp_path):
    doc = write(tmp_path / "town.md", VELMOOR)
    out = ok(seal("ingest", doc))
    assert "new: " in out and "'Velmoor': 1 passage(s), 0 question(s)" in out
    assert "ingested 1 document(s): 1 passage(s), 0 question(s) queued" in out
    with store(home) as s:
        (d,) = s.documents()
        (p,) = s.passages()
        assert (d["title"], d["kind"], d["source"]) == ("Velmoor", "md", str(doc))
        assert p["title"] == "Velmoor" and p["text"].startswith("Velmoor is a lakeside town")
        assert p["n_tokens"] > 10
        assert s.queue_summary()["pending"] == 1


def test_txt_title_is_stem_unless_given(seal, home, tmp_path):
    ok(seal("ingest", write(tmp_path / "glass_snails.txt", "Glass snails glow green in cold water.\n")))
    ok(seal("ingest", "--title", "Hollin Cave", write(tmp_path / "b.txt", "The Hollin Cave lies under the shelf.")))
    with store(home) as s:
        assert [d["title"] for d in s.documents()] == ["glass_snails", "Hollin Cave"]


def test_folder_is_walked_sorted_skipping_hidden_and_other_files(seal, home, tmp_path):
    root = tmp_path / "docs"
    write(root / "b.md", "Bee text about the second thing.")
    write(root / "a.txt", "Alpha text about the first thing.")
    write(root / "sub" / "c.jsonl", json.dumps({"title": "C", "context": "Gamma text about a third."}) + "\n")
    write(root / ".hidden.md", "Hidden text that must not be read.")
    write(root / ".git" / "x.md", "Text in a hidden folder.")
    write(root / "notes.pdf", b"%PDF-1.4 not text\0")
    write(root / "image.png", b"\x89PNG\0")
    ok(seal("ingest", root))
    with store(home) as s:
        assert [Path(d["source"]).name for d in s.documents()] == ["a.txt", "b.md", "c.jsonl"]


def test_stdin_title_from_heading_else_stdin_else_flag(seal, home):
    ok(seal("ingest", "-", input="# Saltglass Ferry\n\nThe ferry is pulled along a steel cable.\n"))
    ok(seal("ingest", "-", input="The Gannet Queen carries 60 passengers.\n"))
    ok(seal("ingest", "-", "--title", "Ferrow Strait", input="The strait is 4.2 kilometres wide.\n"))
    with store(home) as s:
        docs = s.documents()
        assert [d["title"] for d in docs] == ["Saltglass Ferry", "stdin", "Ferrow Strait"]
        assert {d["source"] for d in docs} == {"-"}
        assert s.passages()[0]["text"] == "The ferry is pulled along a steel cable."


def test_long_document_is_split_on_paragraphs_in_order(seal, home, tmp_path, tokenizer):
    paragraphs = [f"Paragraph {i} tells of the harbour master number {i} and the boats." for i in range(30)]
    doc = write(tmp_path / "long.md", "\n\n".join(paragraphs))
    ok(seal("--set", "ingest.max_passage_tokens=64", "ingest", doc))
    with store(home) as s:
        texts = [p["text"] for p in s.passages()]
        assert len(texts) > 3
        assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 64 for t in texts)
        # whole paragraphs only, in order, nothing lost
        assert [q for t in texts for q in t.split("\n\n")] == paragraphs
        assert [p["seq"] for p in s.passages()] == list(range(len(texts)))
        assert s.queue_summary()["pending"] == len(texts)


# ------------------------------------------------------------------------- chunking
_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzéø0123456789,;'", min_size=1, max_size=14)
_sentence = st.lists(_word, min_size=1, max_size=40).map(lambda ws: " ".join(ws) + ".")
_paragraph = st.lists(_sentence, min_size=1, max_size=12).map(" ".join)
_long_word = st.text(alphabet="xyz", min_size=60, max_size=90)
_document = st.lists(st.one_of(_paragraph, _paragraph, _long_word), min_size=1, max_size=8).map("\n\n".join)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_document, budget=st.sampled_from([16, 24, 48, 128]))
def test_chunks_fit_the_budget_and_keep_every_character_in_order(tokenizer, text, budget):
    text = normalize_text(text)
    chunker = Chunker(tokenizer, budget)
    chunks = chunker.split(text)
    for chunk, n in chunks:
        assert chunk == chunk.strip() and chunk
        assert n == chunker.count(chunk)
        assert n <= budget  # a word over the budget is cut inside: no chunk overflows
    assert "".join("".join(c.split()) for c, _ in chunks) == "".join(text.split())  # nothing lost or reordered
    at = 0
    for chunk, _ in chunks:  # each chunk is a slice of the text, in order
        at = text.index(chunk, at) + len(chunk)
    # a paragraph that fits is never cut: it lies whole inside one chunk
    for paragraph in text.split("\n\n"):
        if chunker.count(paragraph) <= budget:
            assert any(paragraph in c for c, _ in chunks)


def test_short_text_is_one_chunk(tokenizer):
    assert Chunker(tokenizer, 64).split("One short line.") == [("One short line.", 4)]


def test_answers_are_matched_with_gradings_squad_normalisation():
    assert normalize("The  Merrow!") == "merrow"
    assert normalize("Levi's Stadium") == "levis stadium"
    assert normalize("Levi's", punct=" ") == "levi s"
    assert normalize("an Apple, a pear") == "apple pear"
    assert normalize("«Paris»") == "paris"
    assert normalize("\u2018Velmoor\u2019 \u201cTown\u201d \u2013 1642 \u2014 Quillon\u2026 \u2039x\u203a \u201eq\u201c") == \
        "velmoor town 1642 quillon x q"
    assert normalize("caf\u00e9 \u0939\u093f\u0928\u094d\u0926\u0940") == "caf\u00e9 \u0939\u093f\u0928\u094d\u0926\u0940"  # letters and marks stay


@pytest.mark.parametrize(
    "passage, answer",
    [
        ("The capital of Varn is \u00abParis\u00bb.", "Paris"),
        ("The capital of Varn is Paris.", "\u00abParis\u00bb"),
        ("He named it \u201cKelmora\u201d \u2014 twice\u2026", "Kelmora \u2014 twice"),
        ("About 2,300 people live there.", "2300"),
        ("It opened at Levi\u2019s Stadium in 1911.", "Levi's Stadium"),
    ],
)
def test_ingest_finds_an_answer_where_grading_would_accept_it(passage, answer):
    assert is_correct(passage, answer)  # grading: the passage, as a prediction, contains the answer
    assert AnswerIndex(["Nothing to see here.", passage]).find(answer) == 1


def test_questions_file_answer_in_guillemets_attaches(seal, home, tmp_path):
    town = write(tmp_path / "varn.txt", "# Varn\n\nThe capital of Varn is \u00abParis\u00bb, on the river Quill.")
    other = write(tmp_path / "other.txt", "# Other\n\nNothing about capitals here.")
    qa = write(tmp_path / "qa.jsonl", qa_lines({"question": "What is the capital of Varn?", "answer": "Paris"}))
    ok(seal("ingest", other, town, "--questions", qa))
    with store(home) as s:
        by_title = {p["title"]: [q["answer"] for q in s.questions(p["id"])] for p in s.passages()}
    assert by_title == {"Other": [], "Varn": ["Paris"]}


# ------------------------------------------------------------------- JSON and JSONL
def test_squad_style_json_slice(seal, home, tmp_path):
    records = squad_records()
    assert len(records) == 8 and len({r["title"] for r in records}) == 4
    doc = write(tmp_path / "slice.json", json.dumps(records))
    out = ok(seal("ingest", doc))
    n_q = sum(len(r["questions"]) for r in records)
    assert f"ingested 1 document(s): 8 passage(s), {n_q} question(s) queued" in out
    with store(home) as s:
        passages = s.passages()
        assert [p["title"] for p in passages] == [r["title"] for r in records]
        assert passages[3]["text"] == records[3]["context"]
        qs = s.questions(passages[3]["id"])
        assert [(q["question"], q["answer"], q["origin"]) for q in qs] == [
            (q["question"], q["answer"], "user") for q in records[3]["questions"]
        ]


def test_jsonl_and_single_object(seal, home, tmp_path):
    recs = squad_records(3)
    ok(seal("ingest", write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in recs[:2]) + "\n\n")))
    ok(seal("ingest", write(tmp_path / "one.json", json.dumps(recs[2], indent=2))))
    with store(home) as s:
        assert [d["kind"] for d in s.documents()] == ["jsonl", "json"]
        assert s.documents()[1]["title"] == recs[2]["title"]
        assert len(s.passages()) == 3


def test_official_squad_layout(seal, home, tmp_path):
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "Dunmarrow",
                "paragraphs": [
                    {
                        "context": "Dunmarrow holds the Festival of Paper Herons in October.",
                        "qas": [{"question": "What festival?", "answers": [{"text": "Festival of Paper Herons"}]}],
                    }
                ],
            }
        ],
    }
    out = ok(seal("ingest", write(tmp_path / "v1.json", json.dumps(data))))
    assert "1 passage(s), 1 question(s) queued" in out


def test_long_json_record_is_chunked_and_questions_follow_their_answers(seal, home, tmp_path):
    filler = " ".join(f"Sentence {i} describes the lanterns of the square." for i in range(40))
    record = {
        "title": "Herons",
        "context": f"The festival began in 1887.\n\n{filler}\n\nThe band plays a march called The Long Wing.",
        "questions": [
            {"question": "Which march?", "answer": "The Long Wing"},
            {"question": "When did it begin?", "answer": "1887"},
            {"question": "Unanswerable?", "answer": "nowhere in the text"},
        ],
    }
    ok(seal("--set", "ingest.max_passage_tokens=100", "ingest", write(tmp_path / "h.json", json.dumps([record]))))
    with store(home) as s:
        passages = s.passages()
        assert len(passages) > 2
        by_passage = {p["id"]: [q["answer"] for q in s.questions(p["id"])] for p in passages}
        first, last = passages[0]["id"], passages[-1]["id"]
        assert set(by_passage[first]) == {"1887", "nowhere in the text"}
        assert by_passage[last] == ["The Long Wing"]


def test_shipped_squad_dev_data_and_gzip_reading(tmp_path):
    """The benchmark data ships gzip-compressed: it reads as a gzip of a plain file does,
    holds every passage and question, and its tune split is the one benchmarks tuned on;
    the test fixture is copied from it, passage for passage."""
    packed = write(tmp_path / "small.json.gz", gzip.compress(SQUAD.read_bytes()))
    assert load_squad(packed) == load_squad(SQUAD) == squad_records()
    data = load_squad(DEFAULT_DATA)
    assert (len(data), sum(len(d["questions"]) for d in data), len({d["title"] for d in data})) == (1791, 9189, 40)
    assert sum(split_of(d["title"]) == "tune" for d in data) == 318
    assert all(d in data for d in squad_records())


def test_full_squad_dev_file(seal, home, tmp_path):
    """Every shipped SQuAD dev passage ingests (its speed is `seal bench`'s business, not a
    timed test's: on a loaded 2-core machine this took 20-31 s)."""
    plain = write(tmp_path / "squad_dev.json", json.dumps(load_squad(DEFAULT_DATA), ensure_ascii=False))
    out = ok(seal("ingest", plain))
    assert "ingested 1 document(s): 1791 passage(s), 9189 question(s) queued" in out
    c = counts(home)
    assert (c["documents"], c["passages"], c["questions"], c["jobs"]) == (1, 1791, 9189, 1791)


# ------------------------------------------------------------------ --questions file
def qa_lines(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_questions_file_attaches_to_passage_containing_answer(seal, home, tmp_path):
    town = write(tmp_path / "town.md", VELMOOR)
    ferry = write(tmp_path / "ferry.md", "# Ferry\n\nThe ferry was founded by Marcus Ovelle in 1911.\n")
    qa = write(
        tmp_path / "qa.jsonl",
        qa_lines(
            {"question": "Who designed the ferry?", "answer": "marcus OVELLE"},
            {"question": "Lake?", "answer": "the Lake Quillon!", "title": "Velmoor"},
            {"question": "Founded when?", "answer": "1642"},
            {"question": "Founded when, ferry?", "answer": "1911", "title": "ferry"},
        ),
    )
    out = ok(seal("ingest", town, ferry, "--questions", qa))
    assert "2 passage(s), 4 question(s) queued" in out
    with store(home) as s:
        p_town, p_ferry = s.passages()
        assert [q["answer"] for q in s.questions(p_town["id"])] == ["the Lake Quillon!", "1642"]
        assert [q["answer"] for q in s.questions(p_ferry["id"])] == ["marcus OVELLE", "1911"]
        assert {q["origin"] for q in s.questions(p_town["id"])} == {"user"}


def test_questions_mismatch_names_the_line(seal, home, tmp_path):
    town = write(tmp_path / "town.md", VELMOOR)
    qa = write(
        tmp_path / "questions.jsonl",
        qa_lines({"question": "a", "answer": "Lake Quillon"}, {"question": "b", "answer": "1642"})
        + "\n"
        + qa_lines({"question": "c", "answer": "Quillon Lake"}),
    )
    r = seal("ingest", town, "--questions", qa)
    assert r.exit_code == 1
    assert r.stderr.strip() == f"Error: {qa} line 4: answer 'Quillon Lake' is not in any ingested passage"
    assert counts(home) is None


def test_questions_answer_must_be_in_the_titled_document(seal, home, tmp_path):
    town = write(tmp_path / "town.md", VELMOOR)
    other = write(tmp_path / "other.md", "# Other\n\nNothing about lakes here.\n")
    qa = write(tmp_path / "qa.jsonl", qa_lines({"question": "Lake?", "answer": "Lake Quillon", "title": "Other"}))
    r = seal("ingest", town, other, "--questions", qa)
    assert r.exit_code == 1 and "line 1: answer 'Lake Quillon' is not in any ingested passage titled 'Other'" in r.stderr


# --------------------------------------------------------------------- duplicates
def test_same_file_twice_is_a_duplicate_and_exits_1(seal, home, tmp_path):
    doc = write(tmp_path / "town.md", VELMOOR)
    ok(seal("ingest", doc))
    before = counts(home)
    r = seal("ingest", doc)
    assert r.exit_code == 1
    assert f"duplicate: {doc} (already ingested from {doc})" in r.stdout
    assert r.stderr.strip() == "Error: nothing new to ingest: 1 duplicate document(s)"
    assert counts(home) == before


def test_same_content_under_another_name_and_mixed_run(seal, home, tmp_path):
    doc = write(tmp_path / "town.md", VELMOOR)
    ok(seal("ingest", doc))
    before = counts(home)
    copy = write(tmp_path / "copy.txt", VELMOOR.replace("\n", "\r\n") + "\n\n\n")  # same words, other bytes
    new = write(tmp_path / "new.md", "# New\n\nSomething new about Pell Marrow.\n")
    r = seal("ingest", copy, new)
    assert r.exit_code == 0, r.output
    assert f"duplicate: {copy} (already ingested from {doc})" in r.stdout
    assert "ingested 1 document(s): 1 passage(s), 0 question(s) queued; 1 duplicate document(s) skipped" in r.stdout
    after = counts(home)
    assert after["documents"] == before["documents"] + 1 and after["jobs"] == before["jobs"] + 1


def test_duplicate_within_one_invocation_and_json_vs_jsonl(seal, home, tmp_path):
    recs = squad_records(2)
    as_json = write(tmp_path / "a.json", json.dumps(recs, indent=1))
    as_jsonl = write(tmp_path / "b.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    r = seal("ingest", as_json, as_jsonl, as_json)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("duplicate:") == 2
    assert counts(home)["passages"] == 2


# ---------------------------------------------------------------------- bad input
def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments of `ingest`, expected text of the one-line error)."""
    good = write(tmp / "fine.md", "# Fine\n\nA perfectly good document about Velmoor.\n")
    qa_ok = write(tmp / "qa_ok.jsonl", qa_lines({"question": "Where?", "answer": "Velmoor"}))
    rec = {"title": "T", "context": "Some context text.", "questions": [{"question": "Q?", "answer": "text"}]}
    return {
        "missing path": ([str(tmp / "nope.md")], "nope.md: no such file or folder"),
        "empty folder": ([str((tmp / "emptydir").resolve())], "no .json, .jsonl, .md, .txt files in this folder"),
        "folder of other files": (
            [str(write(tmp / "odd" / "x.pdf", b"%PDF").parent)],
            "no .json, .jsonl, .md, .txt files",
        ),
        "empty file": ([str(write(tmp / "empty.txt", ""))], "empty.txt: the file is empty"),
        "whitespace file": ([str(write(tmp / "ws.md", "  \n\n\t \n"))], "ws.md: the file is empty"),
        "binary": ([str(write(tmp / "bin.txt", b"abc\0def"))], "bin.txt: a binary file (it contains NUL bytes)"),
        "not utf-8": ([str(write(tmp / "latin.txt", "caf\xe9 au lait".encode("latin-1")))], "latin.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
        "malformed json": ([str(write(tmp / "bad.json", '[\n  {"title": "x",\n   "context": }\n]'))], "bad.json: malformed JSON at line 3, column 15"),
        "malformed jsonl": ([str(write(tmp / "bad.jsonl", json.dumps(rec) + "\n\n{oops\n"))], "bad.jsonl line 3: malformed JSON"),
        "json not records": ([str(write(tmp / "num.json", "42"))], "num.json: expected a JSON object or a list of objects"),
        "json empty list": ([str(write(tmp / "none.json", "[]"))], "none.json: no records"),
        "record without context": (
            [str(write(tmp / "noctx.json", json.dumps([rec, {"title": "No context"}])))],
            'noctx.json: record 2: no "context" text',
        ),
        "record with blank context": (
            [str(write(tmp / "blank.jsonl", json.dumps(rec) + "\n" + json.dumps({**rec, "context": "  "}) + "\n"))],
            'blank.jsonl line 2: no "context" text',
        ),
        "record with malformed questions": (
            [str(write(tmp / "badq.json", json.dumps([rec, {**rec, "context": "Other.", "questions": [{"question": "Q?"}]}])))],
            'badq.json: record 2: question 1 needs "question" and "answer" strings',
        ),
        "record with questions not a list": (
            [str(write(tmp / "badq2.json", json.dumps({**rec, "questions": "Q?"})))],
            'badq2.json: "questions" must be a list',
        ),
        "markdown with only a title": ([str(write(tmp / "title.md", "# Just a title\n"))], "there is no text after the title"),
        "unsupported extension": ([str(write(tmp / "paper.pdf", "%PDF"))], "paper.pdf: unsupported file type '.pdf'"),
        "one bad file among good ones": ([str(good), str(write(tmp / "empty2.md", "\n"))], "empty2.md: the file is empty"),
        "oversized document": (
            ["--max-bytes-100", str(write(tmp / "big.txt", "word " * 100))],
            "big.txt: 500 bytes, over the limit ingest.max_document_bytes = 100",
        ),
        "questions file missing": ([str(good), "--questions", str(tmp / "nope.jsonl")], "nope.jsonl: no such file"),
        "questions file empty": ([str(good), "--questions", str(write(tmp / "qa0.jsonl", "\n"))], "qa0.jsonl: the file is empty"),
        "questions file malformed": (
            [str(good), "--questions", str(write(tmp / "qa1.jsonl", qa_lines({"question": "Q", "answer": "Velmoor"}) + "{nope\n"))],
            "qa1.jsonl line 2: malformed JSON",
        ),
        "questions line without answer": (
            [str(good), "--questions", str(write(tmp / "qa2.jsonl", qa_lines({"question": "Q"})))],
            'qa2.jsonl line 1: needs non-empty "question" and "answer" strings',
        ),
        "questions answer not found": (
            [str(good), "--questions", str(write(tmp / "qa3.jsonl", qa_lines({"question": "Q", "answer": "Atlantis"})))],
            "qa3.jsonl line 1: answer 'Atlantis' is not in any ingested passage",
        ),
        "questions title unknown": (
            [str(good), "--questions", str(write(tmp / "qa4.jsonl", qa_lines({"question": "Q", "answer": "Velmoor", "title": "Nope"})))],
            "qa4.jsonl line 1: no ingested document is titled 'Nope'",
        ),
        "good questions, bad document": ([str(good), str(tmp / "gone.md"), "--questions", str(qa_ok)], "gone.md: no such file"),
        "a FIFO given by name (it used to hang)": ([str(_fifo(tmp / "pipe.txt"))], "pipe.txt: not a regular file (a FIFO)"),
        "a link to /dev/zero (it used to grow without bound)": (
            [str(_link(tmp / "zero.txt", "/dev/zero"))], "zero.txt: not a regular file (a character device)"),
        "deeply nested JSON": ([str(write(tmp / "deep.json", "[" * 100_000 + "]" * 100_000))], "deep.json: JSON nested too deeply"),
        "deeply nested JSONL": ([str(write(tmp / "deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"))],
                                "deep.jsonl line 1: JSON nested too deeply"),
        "markdown with only headings": ([str(write(tmp / "heads.md", "# Title\n\n## Part one\n\n## Part two\n"))],
                                        "heads.md: only headings, no text to learn"),
        "a context of control characters only": ([str(write(tmp / "ctl.json", json.dumps({"context": "\x01\x02\x7f"})))],
                                                 'ctl.json: no "context" text'),
    }


def _fifo(path: Path) -> Path:
    if not path.exists():
        os.mkfifo(path)
    return path


def _link(path: Path, target: str) -> Path:
    if not path.is_symlink():
        path.symlink_to(target)
    return path


def _case_names() -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        return list(_bad_cases(Path(d)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_line_error_and_changes_nothing(seal, home, tmp_path, case):
    (tmp_path / "emptydir").mkdir()
    args, expected = _bad_cases(tmp_path)[case]
    if args[0] == "--max-bytes-100":  # a setting, which goes before the command
        args = ["--set", "ingest.max_document_bytes=100", "ingest", *args[1:]]
    else:
        args = ["ingest", *args]

    # on a fresh home: no store is even created
    r = seal(*args)
    assert r.exit_code != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert expected in lines[0]
    assert counts(home) is None

    # on a home with content: no row changes anywhere, events included
    ok(seal("ingest", "-", "--title", "Seed", input="A seed document about the Brannock River.\n"))
    before = counts(home)
    r = seal(*args)
    assert r.exit_code != 0 and expected in r.stderr
    assert counts(home) == before


# --------------------------------------------------------- durability, concurrency
@pytest.mark.process
def test_ingest_is_durable_for_another_process(seal, home, tmp_path):
    ok(seal("ingest", write(tmp_path / "town.md", VELMOOR)))
    code = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "print(*[c.execute(f'SELECT count(*) FROM {t}').fetchone()[0] for t in ('documents', 'passages', 'jobs')])"
    )
    seen = subprocess.run([sys.executable, "-c", code, str(home / "store.db")], capture_output=True, text=True, check=True)
    assert seen.stdout.split() == ["1", "1", "1"]


def test_reader_is_not_blocked_by_an_open_write_transaction(seal, home, tmp_path):
    ok(seal("ingest", write(tmp_path / "town.md", VELMOOR)))
    writer = sqlite3.connect(home / "store.db", isolation_level=None)
    reader = sqlite3.connect(home / "store.db", timeout=0, isolation_level=None)
    try:
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO events (at, kind, detail) VALUES (0, 'test', '{}')")
        t0 = time.perf_counter()
        reader.execute("BEGIN")
        n_jobs = reader.execute("SELECT count(*) FROM jobs").fetchone()[0]
        n_events = reader.execute("SELECT count(*) FROM events").fetchone()[0]
        reader.execute("COMMIT")
        assert time.perf_counter() - t0 < 0.5
        assert n_jobs == 1 and n_events == 1  # the uncommitted row is invisible
        writer.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    finally:
        writer.close()
        reader.close()


def test_help_texts(seal):
    for cmd in ("ingest", "queue"):
        r = seal(cmd, "--help")
        assert r.exit_code == 0 and "Usage:" in r.stdout
    assert "--questions" in seal("ingest", "--help").stdout


def test_budget_setting_is_checked(seal, home, tmp_path):
    r = seal("--set", "ingest.max_passage_tokens=4", "ingest", write(tmp_path / "a.txt", "Some text."))
    assert r.exit_code == 1
    assert r.stderr.strip() == "Error: ingest: max_passage_tokens must be at least 16"
    assert counts(home) is None


# ------------------------------------------------------------------ the holes a long-running service met
def test_a_200_kb_word_is_cut_into_passages_within_the_budget(seal, home, tmp_path):
    """One 200 KB "word" used to be one 50,000-token passage (the budget is 1,024)."""
    doc = tmp_path / "word.txt"
    import random

    rng = random.Random(0)  # no two chunks alike (a repeated chunk is a duplicate passage)
    doc.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000)) + "\n", encoding="utf-8")
    ok(seal("ingest", doc))
    with Store(home / "store.db") as store:
        passages = store.passages()
        assert len(passages) > 1 and max(p["n_tokens"] for p in passages) <= 1024
        assert "".join(p["text"] for p in passages) == doc.read_text().strip()


def test_control_characters_and_lone_surrogates_are_not_stored(seal, home, tmp_path):
    doc = tmp_path / "odd.json"
    doc.write_text('{"title": "Odd\\u0007 town", "context": "Velmoor\\u0000 lies on \\ud800Lake\\u001b Quillon.\\tIt is old.",'
                   ' "questions": [{"question": "Where\\u0008 is Velmoor?", "answer": "Lake Quillon"}]}', encoding="utf-8")
    ok(seal("ingest", doc))
    with Store(home / "store.db") as store:
        (p,) = store.passages()
        assert p["title"] == "Odd town" and p["text"] == "Velmoor lies on Lake Quillon.\tIt is old."
        assert [q["question"] for q in store.questions(p["id"])] == ["Where is Velmoor?"]


def test_a_passage_repeated_in_one_file_keeps_all_its_questions(seal, home, tmp_path):
    """Its questions used to be dropped without a word when a passage came twice."""
    ctx = "Velmoor is a small lakeside town on Lake Quillon, founded by Oda Feverell."
    doc = tmp_path / "twice.jsonl"
    doc.write_text(json.dumps({"title": "Velmoor", "context": ctx,
                               "questions": [{"question": "Which lake?", "answer": "Lake Quillon"}]}) + "\n"
                   + json.dumps({"title": "Velmoor", "context": ctx,
                                 "questions": [{"question": "Which lake?", "answer": "Lake Quillon"},
                                               {"question": "Who founded it?", "answer": "Oda Feverell"}]}) + "\n",
                   encoding="utf-8")
    out = ok(seal("ingest", doc))
    assert "1 passage(s), 1 already known, 2 question(s)" in out
    with Store(home / "store.db") as store:
        (p,) = store.passages()
        assert sorted(q["question"] for q in store.questions(p["id"])) == ["Which lake?", "Who founded it?"]
    # the same passage in another document later: its questions cannot be added, and it says so
    other = tmp_path / "again.jsonl"
    other.write_text(json.dumps({"title": "Velmoor", "context": ctx,
                                 "questions": [{"question": "Where is it?", "answer": "Lake Quillon"}]}) + "\n"
                     + json.dumps({"title": "New", "context": "Brisk is a hamlet."}) + "\n", encoding="utf-8")
    out = ok(seal("ingest", other))
    assert "1 question(s) of passages learned before were not added" in out


def test_generation_cuts_a_prompt_longer_than_the_context(tokenizer):
    from agent.runtime import Runtime
    from tests.helpers import tiny_llama

    rt = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    rt.model.config.max_position_embeddings = 64
    (g,) = rt.generate([rt.chat("word " * 500)], max_new_tokens=8)  # ~500 tokens: it used to overflow the context
    assert g.n_tokens <= 8


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
    | st.text(alphabet="ab .\n\x00\x07\x1b\x7f\ud800\udfff", max_size=20),  # controls, lone surrogates
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["title", "context", "questions", "question", "answer", "data", "paragraphs", "qas",
                         "answers", "text", "x"]), inner, max_size=5),
    max_leaves=20)
_payload = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=200).map(lambda t: t.encode("utf-16")),
    _json_value.map(lambda v: json.dumps(v).encode()),
    st.lists(_json_value, max_size=4).map(lambda vs: "\n".join(json.dumps(v) for v in vs).encode()),
)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_payload, ext=st.sampled_from([".txt", ".md", ".json", ".jsonl"]))
def test_fuzzed_input_is_ingested_or_refused_in_one_line(tokenizer, tmp_path_factory, data, ext):
    """Any bytes, encoding or JSON shape, as any supported kind of file: either it
    parses into passages within the budget, or it is an IngestError of one line;
    nothing else is raised, and nothing hangs (an alarm fails the test)."""
    import signal

    from agent.documents import IngestError
    from agent.ingest import IngestConfig, prepare
    from agent.runtime import ModelConfig

    path = tmp_path_factory.mktemp("fuzz") / f"doc{ext}"
    path.write_bytes(data)

    def hung(*_):
        raise TimeoutError("ingest hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        docs = prepare([str(path)], cfg=IngestConfig(max_passage_tokens=64), model=ModelConfig(), tokenizer=tokenizer)
    except IngestError as e:
        assert str(e) and "\n" not in str(e)
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    for d in docs:
        assert d.passages and all(p.text and p.n_tokens <= 64 for p in d.passages)
        for p in d.passages:
            p.text.encode("utf-8")  # storable: no lone surrogate
            assert all(q.question.encode("utf-8") and q.answer.encode("utf-8") for q in p.questions)
