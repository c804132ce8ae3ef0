"""Answering and scoring on a vLLM server with multi-LoRA: an engine (``agent.engine``).

The server runs on the GPU machine, started with runtime LoRA loading on::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank 16

(``--max-lora-rank`` at least ``lora.rank``; ``--max-loras``: how many versions one batch
may mix). vLLM is installed there with ``pip install vllm``, not as an extra of seal:
its PyPI wheels are CUDA builds pinned to their own torch. This client needs only
httpx and the model's tokenizer; it speaks vLLM's OpenAI-compatible HTTP API, with
the fields of vLLM's own source (``CompletionRequest`` in
``vllm/entrypoints/openai/completion/protocol.py``, the LoRA routes in
``vllm/entrypoints/serve/lora/`` and ``vllm/entrypoints/openai/models/serving.py``):

- ``generate``: one ``POST /v1/completions`` per prompt, all in flight together (vLLM
  batches concurrent requests). ``model`` is the adapter's name, or the base model;
  ``prompt`` is token ids, tokenised here as ``Runtime.generate`` does (its start cut
  so that the answer fits the context, ``max_model_len`` from ``GET /v1/models``);
  ``temperature`` 0 is greedy; ``top_k`` -1 is off (every vLLM release accepts it);
  ``seed`` is the call's seed plus the prompt's index, so that repeats of one prompt in
  a call are different samples, as in ``Runtime``'s batches, and a call is
  reproducible. ``n_tokens`` is ``usage.completion_tokens``, which counts the EOS that
  ended a completion, as ``Runtime`` does.
- ``loglik``: prompt and continuation as token ids, tokenised separately exactly as
  ``agent.runtime.encode_pairs`` does so that the boundary is the same, ``max_tokens`` 1 and
  ``prompt_logprobs`` 0: vLLM then returns, at every prompt position but the first,
  the log-probability of the token that is there (with the top 0 others); the
  continuation's are summed.
- ``load_adapter``: the weights' sha256 is checked here, then ``POST
  /v1/load_lora_adapter {"lora_name", "lora_path"}``. The server reads the folder
  itself, so it must see this filesystem at the same path (a shared volume); a
  committed version's folder never changes after its atomic rename, so what was
  checked is what it reads. vLLM refuses a second load under a name it serves, so a
  name it already serves is unloaded first (``POST /v1/unload_lora_adapter``).

Every refusal or failure of the server is one ``EngineError`` carrying its message.
"""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from adapters import files

from ..engine import EngineError
from ..runtime import Generation, LogLik, encode_pairs

COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
NO_RUNTIME_LORA = "the server does not load LoRA adapters at run time: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"


def continuation_loglik(choice: dict, ids: list[int], start: int) -> LogLik:
    """The continuation's log-likelihood from a choice's ``prompt_logprobs`` (one entry
    per prompt token, None first; each a {token id: {"logprob", ...}} map): the same
    tokens as ``Runtime.loglik`` sums, those from ``start`` on (never the first)."""
    lps = choice.get("prompt_logprobs") or []
    if len(lps) != len(ids):
        raise EngineError(f"the server returned {len(lps)} prompt log-probabilities for {len(ids)} tokens")
    span = range(max(start, 1), len(ids))
    total = 0.0
    for i in span:
        entry = (lps[i] or {}).get(str(ids[i]))
        if entry is None:
            raise EngineError(f"the server returned no log-probability for prompt token {i} (id {ids[i]})")
        total += float(entry["logprob"])
    return LogLik(total=total, n_tokens=len(span))


def verify_folder(folder: Path, sha256: str | None) -> None:
    """What ``adapters.files.load`` checks before it loads, for a server that loads the
    folder itself: both files are there and the weights have the expected sha256."""
    weights = folder / files.WEIGHTS_NAME
    try:
        data = weights.read_bytes()
    except OSError as e:
        raise EngineError(f"cannot read {weights}: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise EngineError(f"{weights}: sha256 {digest[:12]}… does not match the expected {sha256[:12]}…")
    if not (folder / files.CONFIG_NAME).is_file():
        raise EngineError(f"{folder} has no {files.CONFIG_NAME}")


def server_message(r: httpx.Response) -> str:
    """A failed response's message, on one line: ``{"error": {"message"}}`` (recent
    vLLM), ``{"message"}`` (older), ``{"detail"}`` (no such route), else the text."""
    try:
        d = r.json()
    except ValueError:
        d = None
    msg = None
    if isinstance(d, dict):
        err = d.get("error")
        msg = err.get("message") if isinstance(err, dict) else None
        msg = msg or d.get("message") or d.get("detail")
    msg = str(msg) if msg else (r.text.strip() or r.reason_phrase)
    return " ".join(msg.split())[:500]


class VllmEngine:
    """An engine on ``vllm serve MODEL --enable-lora`` (see the module docstring).
    ``base_url`` is the server's root (a trailing ``/v1`` is dropped), ``model`` the
    served base model's name, ``tokenizer`` that model's tokenizer. ``client`` replaces
    the HTTP client (tests pass one bound to an in-process server)."""

    name = "vllm"

    def __init__(self, base_url: str, model: str, tokenizer, *, api_key: str | None = None,
                 timeout_s: float = 600.0, concurrency: int = 16, context_length: int | None = None,
                 adapter_dir: Path | None = None, client: httpx.Client | None = None):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None  # where live adapters are written for the server
        self._live: dict[str, str] = {}  # a live adapter's slot -> the name its current weights are served under
        self.model, self.tokenizer = model, tokenizer
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = max(1, concurrency)
        self._context_length = context_length
        self._own_client = client is None
        self.client = client if client is not None else httpx.Client(timeout=timeout_s)

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: dict | None = None, *, no_route: str = "") -> httpx.Response:
        try:
            r = self.client.request(method, self.base_url + path, json=body, headers=self.headers)
        except httpx.HTTPError as e:
            raise EngineError(f"vLLM server {self.base_url}: {type(e).__name__}: {e}") from None
        if r.is_error:
            msg = server_message(r)
            if r.status_code == 404 and no_route and msg == "Not Found":
                msg = f"{msg} ({no_route})"
            raise EngineError(f"vLLM server {self.base_url}{path}: {r.status_code} {msg}")
        return r

    def _complete_all(self, bodies: list[dict]) -> list[dict]:
        """Each body to /v1/completions, ``concurrency`` in flight; the first choice of
        each answer, in order, with the answer's ``usage`` in it."""
        if not bodies:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            answers = list(pool.map(lambda b: self._request("POST", COMPLETIONS, b).json(), bodies))
        return [{**a["choices"][0], "usage": a.get("usage") or {}} for a in answers]

    def _models(self) -> list[dict]:
        return self._request("GET", MODELS).json().get("data") or []

    @property
    def context_length(self) -> int:
        """Tokens of prompt + generation the server takes (its ``max_model_len``)."""
        if self._context_length is None:
            cards = self._models()
            card = next((c for c in cards if c.get("id") == self.model), None)
            if card is None or not card.get("max_model_len"):
                served = ", ".join(str(c.get("id")) for c in cards) or "nothing"
                raise EngineError(f"vLLM server {self.base_url} does not serve {self.model!r} (it serves {served})")
            self._context_length = int(card["max_model_len"])
        return self._context_length

    def served_adapters(self) -> list[str]:
        """The LoRA adapters the server serves now (every model but the base)."""
        return [c["id"] for c in self._models() if c.get("id") != self.model]

    # ---------------------------------------------------------------- engine
    def generate(self, prompts: list[str], *, adapter: str | None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[Generation]:
        room = max(1, self.context_length - max_new_tokens)  # as Runtime: a long prompt loses its start
        bodies = [
            {"model": adapter or self.model, "prompt": self.tokenizer(p, add_special_tokens=False)["input_ids"][-room:],
             "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
             "top_k": -1, "seed": seed + i}
            for i, p in enumerate(prompts)
        ]
        return [Generation(text=c["text"].strip(), n_tokens=int(c["usage"]["completion_tokens"]))
                for c in self._complete_all(bodies)]

    def loglik(self, prompts: list[str], continuations: list[str], *, adapter: str | None) -> list[LogLik]:
        pairs = encode_pairs(self.tokenizer, prompts, continuations)
        bodies = [{"model": adapter or self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": 0} for ids, _ in pairs]
        return [continuation_loglik(c, ids, start)
                for (ids, start), c in zip(pairs, self._complete_all(bodies), strict=True)]

    def load_adapter(self, name: str, folder: Path, sha256: str | None) -> None:
        folder = Path(folder).resolve()
        verify_folder(folder, sha256)
        if name in self.served_adapters():
            self.unload_adapter(name)
        self._request("POST", LOAD, {"lora_name": name, "lora_path": str(folder)}, no_route=NO_RUNTIME_LORA)

    def unload_adapter(self, name: str) -> None:
        self._request("POST", UNLOAD, {"lora_name": name}, no_route=NO_RUNTIME_LORA)

    def serve_live(self, peft_model, adapter: str | None) -> str | None:
        """The live adapter's weights, written into ``adapter_dir`` (a folder the server
        reads) under a name made of the slot and their sha256, and loaded, unless the
        server has them already; the slot's previous weights are unloaded first and their
        folder removed. The base model needs nothing."""
        if adapter is None:
            return None
        weights, config, sha = files.encode(peft_model, adapter)
        name = f"seal-{adapter}-{sha[:16]}"
        old = self._live.get(adapter)
        if old == name:
            return name
        if self.adapter_dir is None:
            raise EngineError("engine.adapter_dir is not set: the vLLM server needs a folder it can read the "
                              "learner's adapters from")
        if old is not None:  # first, so that the server holds one version per slot
            self._live.pop(adapter)
            try:
                self.unload_adapter(old)
            except EngineError:
                pass  # a server restarted meanwhile no longer has it: nothing to unload
            shutil.rmtree(self.adapter_dir / old, ignore_errors=True)
        folder = self.adapter_dir / name
        if not folder.exists():
            files.write(folder, weights, config, sha)
        self.load_adapter(name, folder, sha)
        self._live[adapter] = name
        return name

    def close(self) -> None:
        """Close the HTTP client if this engine made it; the server and what it has
        loaded are left as they are (other clients may use them)."""
        if self._own_client:
            self.client.close()
