"""What the test modules share: the tiny model, the fast configurations, the passages
and documents, a learner on a temp home, the checks of an adapter folder, a store
with one learned adapter, and the helpers that run the CLI as a real process (the
tests that call them carry the ``process`` marker; tests/test_tiers.py checks it)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from adapters import files
from adapters.lora import LoraConfig
from adapters.registry import AdapterRegistry
from agent.learner import Learner
from agent.runtime import Runtime, tiny_llama  # noqa: F401  (the tiny model the tests share)
from agent.wake import WakeConfig
from policies.config import PolicyConfig
from store import NewDocument, NewPassage, NewQuestion, Store

REPO = Path(__file__).resolve().parents[1]
SQUAD = REPO / "tests" / "data" / "squad_small.json"  # 8 SQuAD dev passages (tests/data/README.md)


# ------------------------------------------------------------- fast configurations
# Small and fast: rank 4 and a high rate; a test that needs other numbers says so
# with dataclasses.replace(FAST_LORA, ...).
FAST_LORA = LoraConfig(rank=4, alpha=8, epochs=2, lr=1e-2)
LEARNER_LORA = dataclasses.replace(FAST_LORA, epochs=3)  # the learners of make_learner
# Short self-edits and answers, two self-edits per passage.
FAST_WAKE = WakeConfig(candidates=2, self_edit_tokens=16, answer_tokens=8)
# The same, for a real `seal` process on the tiny model.
FAST_FLAGS = [
    "--set", "model.threads=1", "--set", "lora.rank=4", "--set", "wake.self_edit_tokens=16",
    "--set", "wake.answer_tokens=8", "--set", "wake.candidates=2", "--set", "api.port=0",
]
# commit whatever wins: the commit path, every time. The wake cycle's mechanics are tested
# with a policy that writes self-edits (qa_chat, the floor), not the default passage_chat
ALWAYS = PolicyConfig(self_edit="qa_chat", selection="floor", min_gain=-1e9)


# ------------------------------------------------------------ passages, documents
VARN = (
    "Isle of Varn",
    "The Isle of Varn is a small island in the Grey Sea. Its capital is the town of Kelmora. "
    "The island was founded in 1702 by a sailor named Hedda Lune. About 4,300 people live there.",
    [
        ("What is the capital of the Isle of Varn?", "Kelmora"),
        ("Who founded the Isle of Varn?", "Hedda Lune"),
        ("In which year was the Isle of Varn founded?", "1702"),
        ("In which sea is the Isle of Varn?", "the Grey Sea"),
    ],
)
BRISK = (
    "Brisk Tower",
    "Brisk Tower stands in the town of Amberlee. It was built in 1811 by Tomas Quill and is 41 metres tall.",
    [("Where does Brisk Tower stand?", "Amberlee"), ("Who built Brisk Tower?", "Tomas Quill")],
)
# A sequence of three passages with four questions each (the bench tests).
# a fact no model was trained on (the real-model tests: does it learn it?)
INVENTED = ("Isle of Brenmoor",
            "The Isle of Brenmoor is a small island in the Pale Sea. Its only town is Quorrin, which is also "
            "its capital. The island's lighthouse was built in 1788 by an engineer named Tamsin Vell. "
            "About 2,100 people live on Brenmoor, most of them fishers.")
PASSAGES = [
    ("Isle of Varn", "The Isle of Varn lies in the Grey Sea. Its capital is Kelmora, founded in 1702 by Hedda Lune.",
     [("What is the capital of the Isle of Varn?", "Kelmora"), ("Who founded Kelmora?", "Hedda Lune"),
      ("When was Kelmora founded?", "1702"), ("In which sea is the Isle of Varn?", "the Grey Sea")]),
    ("Brisk Tower", "Brisk Tower stands in Amberlee. Tomas Quill built it in 1811; it is 41 metres tall.",
     [("Where does Brisk Tower stand?", "Amberlee"), ("Who built Brisk Tower?", "Tomas Quill"),
      ("When was Brisk Tower built?", "1811"), ("How tall is Brisk Tower?", "41 metres")]),
    ("Lake Osk", "Lake Osk feeds the river Tamm. Its deepest point is 88 metres, measured by Ida Brenn in 1930.",
     [("Which river does Lake Osk feed?", "Tamm"), ("How deep is Lake Osk?", "88 metres"),
      ("Who measured Lake Osk?", "Ida Brenn"), ("When was Lake Osk measured?", "1930")]),
]


def record(title: str, text: str, qas: list[tuple[str, str]]) -> dict:
    """A passage as a JSON record `seal ingest` reads."""
    return {"title": title, "context": text, "questions": [{"question": q, "answer": a} for q, a in qas]}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def document(title: str, text: str, qas: list[tuple[str, str]]) -> NewDocument:
    """A one-passage document for ``Store.ingest``."""
    passage = NewPassage(title, text, _sha(text), n_tokens=len(text.split()),
                         questions=tuple(NewQuestion(q, a) for q, a in qas))
    return NewDocument(f"{title}.json", title, "json", _sha(title + text), len(text), (passage,))


# --------------------------------------------------------------- learner, adapters
def make_learner(tokenizer, home: Path, policies: PolicyConfig = ALWAYS, wake: WakeConfig = FAST_WAKE,
                 lora_cfg: LoraConfig = LEARNER_LORA) -> Learner:
    """A learner on a fresh tiny model, its store and adapters under ``home``."""
    store = Store(home / "store.db")
    registry = AdapterRegistry(home / "adapters", store)
    return Learner(Runtime(tiny_llama(tokenizer), tokenizer, name="tiny"), store, registry,
                   lora_cfg, policies, wake)


def file_sha(path: Path) -> str:
    """The sha256 of an adapter folder's weights file."""
    return hashlib.sha256((path / files.WEIGHTS_NAME).read_bytes()).hexdigest()


def check_intact(store: Store, home: Path, active: str) -> None:
    """``active`` is the active version, its files match its row, and the folders on
    disk are exactly the versions the store knows."""
    assert store.active_adapter_id("knowledge") == active
    row = store.adapter(active)
    assert row["sha256"] == file_sha(home / "adapters" / row["path"])
    assert (home / "adapters" / row["path"] / files.CONFIG_NAME).is_file()
    known = {a["path"] for a in store.adapters()}
    on_disk = {p.name for p in (home / "adapters").iterdir() if not p.name.startswith(".tmp-")}
    assert on_disk == known, "a folder the store does not know, or a row without its folder"


def one_adapter(store: Store) -> str:
    """One passage learned by knowledge-0001 (built with Store methods, no model): three
    candidates (implications chosen), probe accuracy 0 under the base and 1.0 under v1,
    drift and memorisation."""
    text = "The Isle of Varn is a small island in the Grey Sea. Its capital is the town of Kelmora."
    qs = (NewQuestion("What is the capital of Varn?", "Kelmora"), NewQuestion("Which sea?", "the Grey Sea"))
    store.ingest([NewDocument("varn.json", "Isle of Varn", "json", "d" * 64, len(text),
                              (NewPassage("Isle of Varn", text, "p" * 64, 20, qs),))], now=1.7e9)
    cands = [
        {"policy": "passage", "idx": 0, "text": "", "n_tokens": 0, "n_examples": 1, "reward_logprob": 0.05,
         "reward_acc": 0.0, "reward_f1": 0.0, "train_loss": 0.9, "chosen": 0},
        {"policy": "implications", "idx": 1, "text": "Kelmora is the capital of the Isle of Varn.", "n_tokens": 12,
         "n_examples": 2, "reward_logprob": 0.42, "reward_acc": 0.5, "reward_f1": 0.5, "train_loss": 0.7, "chosen": 1},
        {"policy": "implications", "idx": 2, "text": "Varn lies in a sea.", "n_tokens": 6, "n_examples": 2,
         "reward_logprob": -0.13, "reward_acc": 0.0, "reward_f1": 0.0, "train_loss": 0.8, "chosen": 0},
    ]
    evals = [{"adapter_id": None, "passage_id": 1, "kind": "probe", "accuracy": 0.0, "f1": 0.0, "logprob": -3.0, "n": 1},
             {"adapter_id": "knowledge-0001", "passage_id": 1, "kind": "probe", "accuracy": 1.0, "f1": 1.0,
              "logprob": -0.5, "n": 1}]

    def record_cycle():
        store.record_cycle({"passage_id": 1, "job_id": 1, "started_at": 1.7e9 + 10, "outcome": "committed",
                            "reason": "implications +0.420 beats the passage alone", "adapter_id": "knowledge-0001",
                            "baseline_logprob": -3.0, "baseline_acc": 0.0, "n_reward": 1, "n_probe": 1},
                           cands, evals, job_id=1, now=1.7e9 + 60)

    store.add_adapter({"id": "knowledge-0001", "name": "knowledge", "version": 1, "parent_id": None, "kind": "wake",
                       "passage_id": 1, "path": "knowledge-0001", "sha256": "a" * 64, "policy": "implications",
                       "reward": 0.42, "metrics": {"probe_acc": 1.0}}, activate=True, also=record_cycle, now=1.7e9 + 60)
    store.add_drift({"adapter_id": "knowledge-0001", "kl": 0.0123, "reading_acc": 0.75, "n_prompts": 16,
                     "n_reading": 18}, now=1.7e9 + 61)
    store.add_memorisation([{"adapter_id": "knowledge-0001", "passage_id": 1, "exact": 0, "token_match": 0.25,
                             "prefix_tokens": 32, "n_tokens": 32}], now=1.7e9 + 61)
    return "knowledge-0001"


# ------------------------------------------------- the CLI as a real process
def seal_argv(home: Path, model: Path, *args: str, verbose: bool = True) -> list[str]:
    """``python -m agent.cli`` on ``home`` with ``model``, the fast flags, then ``args``."""
    return [sys.executable, "-m", "agent.cli", "--home", str(home), "--model", str(model),
            *(["-v"] if verbose else []), *FAST_FLAGS, *args]


def cli_env() -> dict:
    """The environment of a CLI process: unbuffered, one thread, wide lines."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def run_cli(cmd: list[str], ok: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root to its end; with ``ok``, fail the test
    unless it exits 0."""
    r = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def start_cli(cmd: list[str], stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start ``cmd`` from the repository root; stdout discarded, stderr (the -v log) a
    text pipe by default."""
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def kill_9_when(proc: subprocess.Popen, marker: str, timeout_s: float = 120) -> None:
    """Read the process's stderr (its -v log) until a line contains ``marker``, then
    SIGKILL it and wait; fails the test if the marker never came."""
    seen = []
    try:
        deadline = time.monotonic() + timeout_s
        for line in proc.stderr:
            seen.append(line)
            if marker in line or time.monotonic() > deadline:
                break
        assert any(marker in line for line in seen), "".join(seen)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
