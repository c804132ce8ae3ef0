"""agent.engine and agent.cluster.vllm_engine: the local engine, and the vLLM engine's
contract against a stub of vLLM's OpenAI-compatible server.

The stub implements the requests ``VllmEngine`` makes (``/v1/completions`` with
token-id prompts, ``prompt_logprobs``, ``seed``, ``temperature``; the runtime LoRA
routes; ``/v1/models``) the way vLLM answers them, on a ``LocalEngine`` over the tiny
model, so its numbers are real: it runs each prompt's token ids through the model
itself and loads each LoRA a client names into a free slot of that model. The
contract: ``VllmEngine`` through the stub gives what ``LocalEngine`` gives directly,
for the base model and for a version loaded from its folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from adapters import files, lora
from adapters.lora import LoraConfig
from adapters.names import KNOWLEDGE
from agent.cluster.vllm_engine import LOAD, UNLOAD, VllmEngine
from agent.engine import EngineError, LocalEngine
from agent.runtime import Runtime
from tests.helpers import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-base"  # the name the stub serves the base model under
KEY = "test-key"
BLANK = "blank"  # a fresh LoRA (B = 0): the base model's outputs
SLOTS = ("served-1", "served-2")  # where the stub puts the LoRAs its clients load
QA = [("What is the capital of the Isle of Varn?", "Kelmora"),
      ("Who founded the Isle of Varn, and in which year?", "Hedda Lune, in 1702"),
      ("In which sea is it?", "the Grey Sea")]


def vllm_error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


class VllmStub:
    """vLLM's OpenAI-compatible server, as far as ``VllmEngine`` uses it, on a
    LocalEngine. ``seen`` records every request (method, path, JSON body)."""

    def __init__(self, local: LocalEngine, *, runtime_lora: bool = True, api_key: str = KEY):
        self.local, self.api_key = local, api_key
        self.rt = local.runtime
        self.loras: dict[str, str] = {}  # LoRA name -> the slot holding it
        self.seen: list[tuple[str, str, dict | None]] = []
        routes = [Route("/v1/models", self.models), Route("/v1/completions", self.completions, methods=["POST"])]
        if runtime_lora:  # vLLM adds these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
            routes += [Route(LOAD, self.load, methods=["POST"]), Route(UNLOAD, self.unload, methods=["POST"])]
        self.app = Starlette(routes=routes)

    async def _read(self, request: Request) -> dict | None:
        body = await request.json() if request.method == "POST" else None
        self.seen.append((request.method, request.url.path, body))
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise PermissionError
        return body

    async def models(self, request: Request):
        try:
            await self._read(request)
        except PermissionError:
            return vllm_error(401, "Unauthorized", "Unauthorized")
        cards = [{"id": MODEL, "object": "model", "root": MODEL, "max_model_len": self.rt.context_length}]
        cards += [{"id": name, "object": "model", "root": name, "parent": MODEL} for name in self.loras]
        return JSONResponse({"object": "list", "data": cards})

    async def completions(self, request: Request):
        try:
            body = await self._read(request)
        except PermissionError:
            return vllm_error(401, "Unauthorized", "Unauthorized")
        name = body["model"]
        if name != MODEL and name not in self.loras:
            return vllm_error(404, f"The model `{name}` does not exist.", "NotFoundError")
        ids = body["prompt"]
        if isinstance(ids, str):
            ids = self.rt.tokenizer(ids, add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        if len(ids) + body["max_tokens"] > self.rt.context_length:
            return vllm_error(400, f"This model's maximum context length is {self.rt.context_length} tokens; "
                                   f"you asked for {len(ids)} + {body['max_tokens']}.", "BadRequestError")
        if body.get("prompt_logprobs") not in (None, 0):
            return vllm_error(400, "the stub returns prompt_logprobs 0 only", "BadRequestError")
        with self.local.using(self.loras.get(name)):
            prompt_lps = self._prompt_logprobs(ids) if body.get("prompt_logprobs") is not None else None
            new, n, finish = self._generate(ids, body)
        text = self.rt.tokenizer.decode(new[:n], skip_special_tokens=True)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                  "prompt_logprobs": prompt_lps}
        return JSONResponse({"id": "cmpl-stub", "object": "text_completion", "created": int(time.time()),
                             "model": name, "choices": [choice],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                       "total_tokens": len(ids) + n}})

    @torch.no_grad()
    def _prompt_logprobs(self, ids: list[int]) -> list:
        """vLLM's prompt_logprobs with k = 0: None, then each token's own logprob."""
        logits = self.rt.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lps = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        return [None] + [{str(t): {"logprob": float(lp), "rank": None, "decoded_token": None}}
                         for t, lp in zip(ids[1:], lps, strict=True)]

    def _generate(self, ids: list[int], body: dict) -> tuple[list[int], int, str]:
        """The prompt alone, unpadded, as vLLM runs it: the new tokens, how many count
        (up to and including EOS) and the finish reason."""
        tok = self.rt.tokenizer
        kw = {"max_new_tokens": body["max_tokens"], "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
        if body.get("temperature"):
            top_k = body.get("top_k", -1)
            kw |= {"do_sample": True, "temperature": body["temperature"], "top_p": body.get("top_p", 1.0),
                   "top_k": 0 if top_k in (0, -1) else top_k}
        else:
            kw |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(body.get("seed") or 0)
            seq = self.rt.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         **kw)
        new = seq[0, len(ids):].tolist()
        if tok.eos_token_id in new:
            return new, new.index(tok.eos_token_id) + 1, "stop"
        return new, len(new), "length"

    async def load(self, request: Request):
        body = await self._read(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if name in self.loras:
            return vllm_error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        free = [s for s in SLOTS if s not in self.loras.values()]
        if not free:
            return vllm_error(400, "no free LoRA slot", "InvalidUserInput")
        try:
            self.local.load_adapter(free[0], Path(path), None)  # the server reads the folder; it has no checksum
        except EngineError as e:
            return vllm_error(404, f"Loading lora {name} failed: {e}", "NotFoundError")
        self.loras[name] = free[0]
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: Request):
        body = await self._read(request)
        name = body.get("lora_name")
        if name not in self.loras:
            return vllm_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        self.local.unload_adapter(self.loras.pop(name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def local(tokenizer) -> LocalEngine:
    """The tiny model with a ``knowledge`` adapter that changes its outputs, a blank
    one, and the stub's slots. Its own model (the shared tiny runtime stays plain), in
    which EOS scores twice what a newline does, so that some answers end with it."""
    model = tiny_llama(tokenizer, seed=0)
    with torch.no_grad():
        out = model.get_output_embeddings().weight
        out[tokenizer.eos_token_id] = 2 * out[tokenizer("\n", add_special_tokens=False)["input_ids"][0]]
    rt = Runtime(model, tokenizer, name="tiny")
    rt.model = lora.attach(rt.model, LoraConfig(rank=4, alpha=8), names=(KNOWLEDGE, BLANK, *SLOTS))
    g = torch.Generator().manual_seed(1)
    state = lora.snapshot(rt.model, KNOWLEDGE)
    lora.restore(rt.model, KNOWLEDGE, {k: torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else v
                                       for k, v in state.items()})
    return LocalEngine(rt)


@pytest.fixture(scope="module")
def versions(local, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Saved adapter folders and their sha256: ``v1`` is the knowledge adapter, ``v0`` a blank one."""
    root = tmp_path_factory.mktemp("versions")
    return {"v1": (root / "knowledge-0001", files.save(local.model, KNOWLEDGE, root / "knowledge-0001")),
            "v0": (root / "blank", files.save(local.model, BLANK, root / "blank"))}


@pytest.fixture
def stub(local):
    return VllmStub(local)


@pytest.fixture
def engine(stub, tokenizer):
    with TestClient(stub.app) as client:
        e = VllmEngine("http://testserver/v1", MODEL, tokenizer, api_key=KEY, client=client)
        yield e
        e.close()


def prompts(local) -> list[str]:
    return [local.runtime.chat(q) for q, _ in QA] + ["The Isle of Varn is", "Kelmora was founded by"]


def answers() -> list[str]:
    return [a for _, a in QA] + [" a small island", " Hedda Lune"]


def pairs(gens) -> list[tuple[str, int]]:
    return [(g.text, g.n_tokens) for g in gens]


# ------------------------------------------------------------------- the contract
def test_greedy_generations_match_the_local_engine(engine, local, versions):
    ps = prompts(local)
    base = local.generate(ps, adapter=None, max_new_tokens=10)
    learned = local.generate(ps, adapter=KNOWLEDGE, max_new_tokens=10)
    assert pairs(learned) != pairs(base)  # the adapter changes what the model says
    assert {g.n_tokens < 10 for g in base + learned} == {True, False}  # some end with EOS (counted), some run on
    assert pairs(engine.generate(ps, adapter=None, max_new_tokens=10)) == pairs(base)
    engine.load_adapter("knowledge-0001", *versions["v1"])
    assert pairs(engine.generate(ps, adapter="knowledge-0001", max_new_tokens=10)) == pairs(learned)


def test_logliks_match_the_local_engine(engine, stub, local, versions):
    ps, cs = prompts(local), answers()
    base = local.loglik(ps, cs, adapter=None)
    learned = local.loglik(ps, cs, adapter=KNOWLEDGE)
    assert all(abs(a.total - b.total) > 1e-3 for a, b in zip(base, learned, strict=True))
    engine.load_adapter("knowledge-0001", *versions["v1"])
    for adapter, want in ((None, base), ("knowledge-0001", learned)):
        got = engine.loglik(ps, cs, adapter=adapter)
        assert [g.n_tokens for g in got] == [w.n_tokens for w in want]
        assert [g.total for g in got] == pytest.approx([w.total for w in want], abs=1e-4)
    # what went over the wire: prompt + continuation ids, one prompt log-prob each, no generation to speak of
    scoring = [b for m, p, b in stub.seen if p == "/v1/completions"]
    assert {(b["prompt_logprobs"], b["max_tokens"]) for b in scoring} == {(0, 1)}
    assert all(isinstance(t, int) for b in scoring for t in b["prompt"])


def test_two_versions_at_once_each_by_its_name(engine, local, versions):
    ps = prompts(local)[:2]
    engine.load_adapter("knowledge-0001", *versions["v1"])
    engine.load_adapter("blank-0000", *versions["v0"])
    assert set(engine.served_adapters()) == {"knowledge-0001", "blank-0000"}
    assert pairs(engine.generate(ps, adapter="blank-0000", max_new_tokens=6)) == pairs(
        local.generate(ps, adapter=None, max_new_tokens=6))
    assert pairs(engine.generate(ps, adapter="knowledge-0001", max_new_tokens=6)) == pairs(
        local.generate(ps, adapter=KNOWLEDGE, max_new_tokens=6))


def test_sampling_is_reproducible_and_repeats_of_a_prompt_differ(engine, stub, local):
    ps = [local.runtime.chat(QA[0][0])] * 3
    a = engine.generate(ps, adapter=None, max_new_tokens=8, temperature=1.0, seed=3)
    assert pairs(engine.generate(ps, adapter=None, max_new_tokens=8, temperature=1.0, seed=3)) == pairs(a)
    assert len({g.text for g in a}) > 1  # one seed per prompt: repeats are different samples, as in Runtime
    assert pairs(engine.generate(ps, adapter=None, max_new_tokens=8, temperature=1.0, seed=4)) != pairs(a)
    sent = [b for m, p, b in stub.seen if p == "/v1/completions"][:3]
    assert sorted(b["seed"] for b in sent) == [3, 4, 5]
    assert {(b["temperature"], b["top_k"]) for b in sent} == {(1.0, -1)}


def test_a_long_prompt_loses_its_start_as_in_the_runtime(engine, local):
    long = "word " * (local.runtime.context_length + 50)
    want = local.generate([long], adapter=None, max_new_tokens=4)
    assert pairs(engine.generate([long], adapter=None, max_new_tokens=4)) == pairs(want)


def test_a_prompt_beyond_the_servers_context_is_its_error(stub, tokenizer, local):
    long = "word " * (local.runtime.context_length + 50)
    with TestClient(stub.app) as client:  # told a longer context than the server has: nothing is cut
        e = VllmEngine("http://testserver", MODEL, tokenizer, api_key=KEY, client=client, context_length=10**6)
        with pytest.raises(EngineError, match="400 This model's maximum context length"):
            e.generate([long], adapter=None, max_new_tokens=4)


# ------------------------------------------------------------------ adapters, errors
def test_an_unknown_adapter_is_an_engine_error_with_the_servers_message(engine, local):
    with pytest.raises(EngineError, match=r"404 The model `knowledge-9999` does not exist\."):
        engine.generate(prompts(local)[:1], adapter="knowledge-9999", max_new_tokens=4)
    with pytest.raises(EngineError, match="does not exist"):
        engine.loglik(prompts(local)[:1], ["Kelmora"], adapter="knowledge-9999")


def test_a_folder_with_another_sha256_never_reaches_the_server(engine, stub, versions):
    folder, _ = versions["v1"]
    with pytest.raises(EngineError, match="sha256 .* does not match"):
        engine.load_adapter("knowledge-0001", folder, "0" * 64)
    assert stub.seen == []
    with pytest.raises(EngineError, match="cannot read"):
        engine.load_adapter("knowledge-0002", folder.parent / "missing", None)
    assert stub.seen == []


def test_unload_and_load_again_under_the_same_name(engine, stub, local, versions):
    ps = prompts(local)[:2]
    engine.load_adapter("current", *versions["v1"])
    assert pairs(engine.generate(ps, adapter="current", max_new_tokens=6)) == pairs(
        local.generate(ps, adapter=KNOWLEDGE, max_new_tokens=6))
    engine.load_adapter("current", *versions["v0"])  # a name the server serves: unloaded first
    assert [p for m, p, b in stub.seen if p in (LOAD, UNLOAD)] == [LOAD, UNLOAD, LOAD]
    assert pairs(engine.generate(ps, adapter="current", max_new_tokens=6)) == pairs(
        local.generate(ps, adapter=None, max_new_tokens=6))
    engine.unload_adapter("current")
    assert engine.served_adapters() == []
    with pytest.raises(EngineError, match="does not exist"):
        engine.generate(ps, adapter="current", max_new_tokens=4)
    with pytest.raises(EngineError, match="404 The lora adapter 'current' cannot be found"):
        engine.unload_adapter("current")


def test_a_server_without_runtime_lora_loading_says_how_to_start_it(local, tokenizer, versions):
    with TestClient(VllmStub(local, runtime_lora=False).app) as client:
        e = VllmEngine("http://testserver", MODEL, tokenizer, api_key=KEY, client=client)
        with pytest.raises(EngineError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            e.load_adapter("knowledge-0001", *versions["v1"])


def test_a_wrong_key_or_model_name_is_an_engine_error(stub, tokenizer, local):
    with TestClient(stub.app) as client:
        with pytest.raises(EngineError, match="401 Unauthorized"):
            VllmEngine("http://testserver", MODEL, tokenizer, client=client).generate(["x"], adapter=None)
        with pytest.raises(EngineError, match="does not serve 'other'"):
            VllmEngine("http://testserver", "other", tokenizer, api_key=KEY, client=client).generate(["x"], adapter=None)


def test_an_unreachable_server_is_one_engine_error(tokenizer):
    e = VllmEngine("http://127.0.0.1:9", MODEL, tokenizer, timeout_s=5)
    try:
        with pytest.raises(EngineError, match="vLLM server http://127.0.0.1:9: ConnectError"):
            e.loglik(["a"], ["b"], adapter=None)
    finally:
        e.close()


# -------------------------------------------------------------------- the local engine
def test_local_engine_selects_the_adapter_and_puts_the_active_one_back(local):
    model, rt = local.model, local.runtime
    ps, cs = prompts(local)[:2], answers()[:2]
    model.set_adapter(BLANK)
    with model.disable_adapter():
        plain = rt.loglik(ps, cs)
    model.set_adapter(KNOWLEDGE)
    learned = rt.loglik(ps, cs)
    model.set_adapter(BLANK)
    assert [x.total for x in local.loglik(ps, cs, adapter=None)] == [x.total for x in plain]
    assert [x.total for x in local.loglik(ps, cs, adapter=KNOWLEDGE)] == [x.total for x in learned]
    assert model.active_adapter == BLANK
    with pytest.raises(EngineError, match="no adapter named 'nope'"):
        local.generate(ps, adapter="nope")
    assert model.active_adapter == BLANK


def test_local_engine_loads_into_a_slot_checksum_first(local, versions):
    slot = SLOTS[1]
    folder, sha = versions["v1"]
    before = lora.snapshot(local.model, slot)
    with pytest.raises(EngineError, match="does not match"):
        local.load_adapter(slot, folder, "0" * 64)
    assert all(torch.equal(before[k], v) for k, v in lora.snapshot(local.model, slot).items())
    local.load_adapter(slot, folder, sha)
    ps, cs = prompts(local)[:2], answers()[:2]
    assert [x.total for x in local.loglik(ps, cs, adapter=slot)] == [
        x.total for x in local.loglik(ps, cs, adapter=KNOWLEDGE)]
    local.unload_adapter(slot)
    assert slot not in local.adapters()
    with pytest.raises(EngineError, match="no adapter named"):
        local.loglik(ps, cs, adapter=slot)
    local.load_adapter(slot, *versions["v0"])
    assert slot in local.adapters()


# ------------------------------------------------------------------ a wake cycle through vLLM
def test_a_wake_cycle_scored_through_the_vllm_engine_commits_what_the_local_one_commits(tokenizer, tmp_path):
    """The learner's answering and scoring go through its engine: each trial's adapter,
    as it is in memory, is written and loaded into the server under a name of its own
    (``serve_live``), and the cycle picks and commits exactly what it picks and commits
    with the local engine. Training stays local."""
    from agent.wake import learn
    from policies.config import PolicyConfig
    from tests.helpers import LEARNER_LORA, VARN, document, make_learner

    pol = PolicyConfig(self_edit="passage_chat", selection="prefer_edit", min_gain=-1e9)  # greedy scoring only
    here = make_learner(tokenizer, tmp_path / "here", policies=pol)
    here.store.ingest([document(*VARN)])
    (local_report,) = learn(here)

    served = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")  # the server's copy of the same base model
    served.model = lora.attach(served.model, LEARNER_LORA, names=SLOTS)
    stub = VllmStub(LocalEngine(served))
    there = make_learner(tokenizer, tmp_path / "there", policies=pol)
    with TestClient(stub.app) as client:
        there.engine = VllmEngine("http://testserver", MODEL, tokenizer, api_key=KEY, client=client,
                                  adapter_dir=tmp_path / "served")
        there.store.ingest([document(*VARN)])
        (remote_report,) = learn(there)
    loaded = [body["lora_name"] for _, path, body in stub.seen if path == LOAD]
    assert any(n.startswith("seal-trial-") for n in loaded) and any(n.startswith("seal-knowledge-") for n in loaded)
    assert remote_report.outcome == local_report.outcome == "committed"
    assert remote_report.chosen == local_report.chosen
    for a, b in zip(local_report.candidates, remote_report.candidates, strict=True):
        assert b["reward_logprob"] == pytest.approx(a["reward_logprob"], abs=1e-4)
        assert b["reward_acc"] == a["reward_acc"]
    assert there.registry.active(KNOWLEDGE)["sha256"] == here.registry.active(KNOWLEDGE)["sha256"]
    assert sorted(p.name for p in (tmp_path / "served").iterdir()) == sorted(stub.loras)  # old weights removed
