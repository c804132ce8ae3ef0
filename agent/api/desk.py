"""The model desk: the daemon's one model, lent to API requests one at a time.

The daemon's jobs (wake cycles, sleeps) hold its model lock while they use the model;
a chat request waits in a bounded queue and is answered on the desk's own thread,
holding the same lock, between two of those jobs. A full queue refuses at once
(``Busy``: the server answers 503) rather than letting requests pile up behind an
hour of learning. The desk never touches the daemon's store connection (it belongs
to the model thread): it reads adapter rows through its own.

Which weights answer is the request's ``model``:

- ``seal``: the active knowledge adapter (what the daemon has learned so far);
- ``seal:base``: the base model, no adapter (to compare what learning changed);
- ``seal:<version>`` (``seal:knowledge-0012``): any committed version whose files
  are still on disk, loaded (sha256 checked) into the scratch ``trial`` slot, which
  every trial overwrites from the knowledge adapter before it trains anyway.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from adapters.names import KNOWLEDGE, TRIAL

BASE = "seal:base"
ACTIVE = "seal"
PREFIX = "seal:"


class Busy(RuntimeError):
    """The desk cannot take the request now (queue full, model not loaded yet)."""


class UnknownModel(ValueError):
    """The request names no model that the desk can answer with."""


@dataclass
class ChatJob:
    """One generation: a formatted prompt and how to generate; the desk fills in the
    answer. ``on_text`` gets each piece of text as it is decoded (the desk's thread)."""

    prompt: str
    model: str = ACTIVE
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    on_text: Callable[[str], None] = lambda text: None
    on_done: Callable[[], None] = lambda: None  # called once, on the desk's thread, whatever the outcome
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)  # it has the model
    done: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    n_prompt: int = 0
    n_tokens: int = 0
    finish: str = "stop"  # stop | length
    error: BaseException | None = None


class Desk:
    """A bounded queue of chat jobs and the thread that answers them: at most
    ``size`` requests are held (waiting for the model or being answered).

    ``learner`` returns the daemon's Learner once its model is loaded (None before);
    ``lock`` is the daemon's model lock; ``adapter_row(id)`` reads one adapter row
    (on the desk's own store connection) and ``folder(row)`` says where its files are.
    """

    def __init__(self, learner: Callable[[], object | None], lock: threading.Lock,
                 adapter_row: Callable[[str], dict | None], folder: Callable[[dict], object], size: int = 8):
        self._learner, self._lock = learner, lock
        self._row, self._folder = adapter_row, folder
        self.size = max(1, size)
        self._jobs: queue.Queue[ChatJob | None] = queue.Queue()
        self._held = 0  # jobs taken and not yet done (waiting or being answered)
        self._count = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="seal-api-desk", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, job: ChatJob) -> ChatJob:
        """Queue a job, or raise Busy when the model is not loaded yet or the queue is full;
        ``UnknownModel`` for a model name the desk cannot serve."""
        if self._learner() is None:
            raise Busy("the model is still loading: try again in a few seconds")
        check_name(job.model)
        with self._count:
            if self._held >= self.size:
                raise Busy(f"{self.size} requests are already waiting for the model: try again later")
            self._held += 1
        self._jobs.put(job)
        return job

    def close(self) -> None:
        self._jobs.put(None)

    @property
    def waiting(self) -> int:
        """Requests taken and not yet answered."""
        return self._held

    # ------------------------------------------------------------------ the desk's thread
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                while not job.cancelled.is_set():  # a request given up on stops waiting for the model
                    if self._lock.acquire(timeout=0.25):
                        try:
                            job.started.set()
                            self._answer(job)
                        finally:
                            self._lock.release()
                        break
            except BaseException as e:  # reported to the request, never kills the desk
                job.error = e
            finally:
                with self._count:
                    self._held -= 1
                job.done.set()
                with contextlib.suppress(BaseException):
                    job.on_done()

    def _answer(self, job: ChatJob) -> None:
        learner = self._learner()
        rt, model = learner.runtime, learner.model
        with self._weights(model, job.model):
            gen = rt.stream(job.prompt, job.on_text, max_new_tokens=job.max_tokens, temperature=job.temperature,
                            top_p=job.top_p, seed=job.seed, stop=job.cancelled.is_set)
        job.text, job.n_tokens = gen.text, gen.n_tokens
        job.n_prompt = rt.n_tokens(job.prompt)
        ended = gen.n_tokens and rt.tokenizer.eos_token_id is not None and gen.n_tokens < job.max_tokens
        job.finish = "stop" if ended or job.cancelled.is_set() else "length"

    @contextlib.contextmanager
    def _weights(self, model, name: str) -> Iterator[None]:
        """The weights the request asked for, for the length of one generation; the
        knowledge adapter is the live one again afterwards."""
        if name == BASE:
            with model.disable_adapter():
                yield
            return
        if name == ACTIVE:
            model.set_adapter(KNOWLEDGE)
            yield
            return
        version = name[len(PREFIX):]
        row = self._row(version)
        if row is None or row["name"] != KNOWLEDGE:
            raise UnknownModel(f"no knowledge version {version!r} (GET /v1/models lists them)")
        if row.get("status") == "pruned":
            raise UnknownModel(f"version {version!r} was pruned: its files are gone")
        from adapters import files

        files.load(model, TRIAL, self._folder(row), expected_sha256=row["sha256"])
        model.set_adapter(TRIAL)
        try:
            yield
        finally:
            model.set_adapter(KNOWLEDGE)


def check_name(model: str) -> None:
    if model != ACTIVE and not model.startswith(PREFIX) or model == PREFIX:
        raise UnknownModel(f"unknown model {model!r}: use 'seal', 'seal:base' or 'seal:<version>' (GET /v1/models)")
