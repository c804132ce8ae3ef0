"""Engines: what generates text and scores answers, with a named adapter version per request.

Issue 15 splits the runtime along two seams. A *trial runner* (``agent.runner``) says
where candidate updates are trained and scored; an *engine* (this module) says where
the model is asked things: ``generate`` (self-edits, questions, answers) and ``loglik``
(the answers' log-likelihood, the reward), each request naming the adapter that
answers it (``adapter=None``: the base model, adapters disabled). An adapter version
reaches an engine as a saved PEFT folder (``adapters.files``) with its sha256:
``load_adapter(name, folder, sha256)`` checks the checksum first, then serves it under
``name`` until ``unload_adapter(name)``.

- ``LocalEngine``: in-process, on the learner's own ``Runtime`` (the default, and what
  every number in the README was measured with);
- ``agent.cluster.vllm_engine.VllmEngine``: a vLLM server with multi-LoRA
  (``vllm serve MODEL --enable-lora``), each adapter version one LoRA loaded at run time.

What runs where: generation and answer log-likelihood are the two calls a remote
inference server does well, and they are what a wake cycle spends most of its time on
when it is not training. Training (``adapters.lora.train``), the distillation teacher's
top-k log-probabilities (``Runtime.topk_logprobs``: ``distill.top_k`` = 32 per token by
default, above vLLM's ``--max-logprobs`` of 20, and consumed as tensors by the trainer
beside it) and the drift KL from the base (``agent.tracking``: it needs the full
next-token distribution, which a server returns only as its top few log-probabilities)
stay in transformers, on the machine that trains.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from adapters import files
from adapters.lora import AdapterError

from .runtime import Generation, LogLik, Runtime

ENGINES = ("local", "vllm")


@dataclass(frozen=True)
class EngineConfig:
    kind: str = field(default="local", metadata={"help": "what generates and scores: local (the daemon's model) | vllm (a vllm serve --enable-lora server; training stays local)"})
    url: str = field(default="", metadata={"help": "vllm: the server, e.g. http://gpu-host:8000"})
    model: str = field(default="", metadata={"help": "vllm: the base model's name on the server (as `vllm serve` was given it); it must be the model seal loads"})
    api_key_env: str = field(default="SEAL_VLLM_API_KEY", metadata={"help": "vllm: the environment variable holding the server's API key, if it has one"})
    adapter_dir: str = field(default="", metadata={"help": "vllm: where the learner's adapters are written for the server to read (a folder both see at this path); empty = <home>/served"})

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise ValueError(f"kind: expected one of {', '.join(ENGINES)}, got {self.kind!r}")
        if self.kind == "vllm" and not (self.url and self.model):
            raise ValueError("kind = vllm needs url and model")


class EngineError(RuntimeError):
    """A request an engine cannot serve (an unknown adapter, a refused or failed load,
    a server error): the message is one line, fit for the user."""


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[str], *, adapter: str | None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[Generation]:
        """Complete each prompt (already formatted) as ``Runtime.generate`` does: greedy
        when ``temperature`` is 0, else sampled, reproducibly for a seed."""
        ...

    def loglik(self, prompts: list[str], continuations: list[str], *, adapter: str | None) -> list[LogLik]:
        """Log-likelihood of each continuation given its prompt, as ``Runtime.loglik``."""
        ...

    def load_adapter(self, name: str, folder: Path, sha256: str | None) -> None:
        """Serve the saved PEFT adapter at ``folder`` under ``name``; its weights' sha256
        is checked before anything is loaded."""
        ...

    def unload_adapter(self, name: str) -> None: ...

    def serve_live(self, peft_model, adapter: str | None) -> str | None:
        """The name under which this engine answers with ``peft_model``'s adapter
        ``adapter`` as it is in memory now (None: the base model). The learner asks
        this before each call: a local engine runs that very model, a remote one is
        sent the adapter's weights whenever they changed (a trial just trained)."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """The engine in this process, on a ``Runtime`` whose model carries named LoRA
    adapters (``adapters.lora.attach``: the Learner's ``knowledge``, ``trial`` and
    ``editor``).

    Locally the adapters are *slots*: a fixed set of names made when the model was
    wrapped, each holding whatever weights were last put in it. ``adapter`` names one
    of them; ``load_adapter`` puts a saved version's weights into an existing slot
    (``adapters.files.load``, checksum checked first) rather than adding a new one;
    ``unload_adapter`` only stops serving a slot under its name (its weights belong to
    whoever filled it) until it is loaded again. A remote engine, by contrast, holds
    one LoRA per version name. Requests run one at a time (the adapters are state of
    the one resident model), and each puts back the adapter that was active before it.
    """

    name = "local"

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.unloaded: set[str] = set()
        self._lock = threading.RLock()

    @property
    def model(self):
        return self.runtime.model

    def adapters(self) -> list[str]:
        """The adapters this engine serves."""
        names = getattr(self.model, "peft_config", None) or {}
        return [n for n in names if n not in self.unloaded]

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """Run the model with ``adapter`` active (None: adapters disabled), holding the
        engine for the whole block; the active adapter is put back after. For callers
        that run the model themselves."""
        with self._lock:
            model = self.model
            if adapter is None:
                off = model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()
                with off:
                    yield
                return
            self._check(adapter)
            before = model.active_adapter
            model.set_adapter(adapter)
            try:
                yield
            finally:
                model.set_adapter(before)

    def _check(self, adapter: str) -> None:
        if adapter not in self.adapters():
            have = ", ".join(self.adapters()) or "none"
            raise EngineError(f"no adapter named {adapter!r} is loaded (have: {have})")

    def generate(self, prompts: list[str], *, adapter: str | None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[Generation]:
        with self.using(adapter):
            return self.runtime.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed)

    def loglik(self, prompts: list[str], continuations: list[str], *, adapter: str | None) -> list[LogLik]:
        with self.using(adapter):
            return self.runtime.loglik(prompts, continuations)

    def load_adapter(self, name: str, folder: Path, sha256: str | None) -> None:
        with self._lock:
            if not hasattr(self.model, "peft_config"):
                raise EngineError("this model carries no LoRA adapters to load into")
            try:
                files.load(self.model, name, Path(folder), expected_sha256=sha256)
            except AdapterError as e:
                raise EngineError(str(e)) from None
            self.unloaded.discard(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self._check(name)
            self.unloaded.add(name)

    def serve_live(self, peft_model, adapter: str | None) -> str | None:
        """The model is this engine's own: its adapter slots are served as they are."""
        return adapter

    def close(self) -> None:
        """Nothing to release: the runtime belongs to the caller."""
