"""The HTTP API (agent/api): OpenAI-compatible chat, documents and views, in process
on a tiny model (Starlette's TestClient), and one real daemon process."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
from starlette.testclient import TestClient

from adapters.names import KNOWLEDGE
from agent.api.config import ApiConfig
from agent.api.server import build_app
from agent.api.service import context, ensure_token, token_path
from agent.config import Config
from agent.home import Home
from agent.wake import learn
from store import Store
from tests.helpers import VARN, document, make_learner, record

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def api(tokenizer, home):
    """A client of the API over a tiny learner, its model lock and its home."""
    learner = make_learner(tokenizer, home)
    lock = threading.Lock()
    cfg = dataclasses.replace(Config(), api=ApiConfig(queue=2, max_tokens=12, default_tokens=6, max_body_bytes=20_000))
    ctx = context(Home(home), cfg, lambda: learner, lock)
    client = TestClient(build_app(ctx), headers={"Authorization": f"Bearer {ctx.token}"})
    client.learner, client.lock, client.ctx = learner, lock, ctx
    yield client
    ctx.desk.close()
    client.close()


def _chat(content: str = "Where is Varn?", **kw) -> dict:
    return {"model": "seal", "messages": [{"role": "user", "content": content}], **kw}


def _events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ------------------------------------------------------------------ the token
def test_every_request_needs_the_token_which_is_private_and_kept(api, home):
    assert token_path(Home(home)).stat().st_mode & 0o777 == 0o600
    assert ensure_token(Home(home)) == api.ctx.token  # made once, kept across restarts
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api.ctx.token}):
        r = api.get("/v1/models", headers={"Authorization": ""} | headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
    r = api.post("/v1/documents?name=x.md", content=b"# X\nNot with a wrong token.\n", headers={"Authorization": "Bearer no"})
    assert r.status_code == 401
    assert not (home / "store.db").exists() or Store(home / "store.db").passages() == []


# ------------------------------------------------------------------ chat
def test_chat_completions_answer_in_openais_shape_streamed_or_not(api):
    r = api.post("/v1/chat/completions", json=_chat(max_tokens=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "seal"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 5 and body["usage"]["prompt_tokens"] > 5

    with api.stream("POST", "/v1/chat/completions", json=_chat(max_tokens=5, stream=True)) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = _events(s.read().decode())
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed.strip() == choice["message"]["content"]  # greedy: the same answer, piece by piece


def test_a_longer_request_is_cut_to_the_limit_and_bad_requests_are_400(api):
    r = api.post("/v1/chat/completions", json=_chat(max_tokens=10_000))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 12
    for bad in ({"messages": []}, {"messages": [{"role": "robot", "content": "hi"}]}, _chat(n=2),
                _chat(temperature=5), _chat(max_tokens=0), {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
        r = api.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad
    r = api.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_models_name_the_active_adapter_the_base_and_each_version(api):
    api.learner.store.ingest([document(*VARN)])
    learn(api.learner)
    active = api.learner.store.active_adapter_id(KNOWLEDGE)
    ids = [m["id"] for m in api.get("/v1/models").json()["data"]]
    assert ids == ["seal", "seal:base", f"seal:{active}"]
    answers = {}
    for name in ("seal", "seal:base", f"seal:{active}"):
        r = api.post("/v1/chat/completions", json={**_chat(max_tokens=6), "model": name})
        assert r.status_code == 200, r.text
        answers[name] = r.json()["choices"][0]["message"]["content"]
    assert answers["seal"] == answers[f"seal:{active}"]  # the active version, by either name
    assert answers["seal:base"] != answers["seal"]  # the base model is not the learned one
    r = api.post("/v1/chat/completions", json={**_chat(), "model": "seal:knowledge-0099"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = api.post("/v1/chat/completions", json={**_chat(), "model": "gpt-4"})
    assert r.status_code == 404


def test_a_full_queue_is_503_at_once_and_the_waiting_requests_are_answered(api):
    got: list[int] = []
    with api.lock:  # the daemon is learning: the model is taken
        threads = [threading.Thread(target=lambda: got.append(api.post("/v1/chat/completions",
                                                                       json=_chat(max_tokens=2)).status_code))
                   for _ in range(5)]
        for t in threads:
            t.start()
        for _ in range(200):
            if len(got) >= 2:
                break
            threading.Event().wait(0.05)
        busy = api.post("/v1/chat/completions", json=_chat())
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_busy"
    for t in threads:
        t.join(60)
    assert sorted(got) == [200, 200, 503, 503, 503]  # a queue of 2: two wait and are answered


# ------------------------------------------------------------------ documents
def test_documents_are_ingested_as_seal_ingest_would_and_bad_ones_change_nothing(api, home):
    r = api.post("/v1/documents?name=varn.json", content=json.dumps(record(*VARN)).encode())
    assert r.status_code == 201, r.text
    assert r.json() == {"passages": 1, "questions": len(VARN[2]), "documents": [{
        "status": "new", "source": "varn.json", "title": VARN[0], "passages": 1, "passages_known": 0,
        "questions": len(VARN[2]), "questions_dropped": 0, "questions_offered": len(VARN[2]), "duplicate_of": None}]}
    with Store(home / "store.db") as s:
        before = (len(s.passages()), s.queue_summary())
    assert before[1]["pending"] == 1
    r = api.post("/v1/documents?name=varn.json", content=json.dumps(record(*VARN)).encode())
    assert r.status_code == 409 and r.json()["error"]["code"] == "duplicate"
    for name, body, words in (("bad.json", b'{"title": oops}', "malformed JSON"), ("x.pdf", b"%PDF", "unsupported"),
                              ("empty.md", b"  \n", "empty"), ("bin.txt", b"a\0b", "binary"),
                              ("big.txt", b"word " * 5000, "over the limit")):
        r = api.post(f"/v1/documents?name={name}", content=body)
        assert 400 <= r.status_code < 500, (name, r.text)
        msg = r.json()["error"]["message"]
        assert words in msg and "\n" not in msg, (name, msg)
    r = api.post("/v1/documents", content=b"# Brisk\nBrisk is a river town.\n",
                 headers={"Content-Type": "text/markdown"})
    assert r.status_code == 201 and r.json()["documents"][0]["title"] == "Brisk"
    with Store(home / "store.db") as s:
        assert len(s.passages()) == before[0] + 1  # only the good one


def test_a_batch_is_one_seal_ingest_call_questions_included_all_or_nothing(api, home):
    batch = {"Content-Type": "application/vnd.seal.ingest+json"}
    notes = {"name": "brisk.md", "content": "# Brisk\nBrisk is a river town. Its bridge was built in 1722.\n"}
    qs = {"name": "qa.jsonl", "content": json.dumps({"question": "When was the bridge of Brisk built?",
                                                    "answer": "1722"}) + "\n"}
    bad = {"name": "bad.jsonl", "content": '{"title": "x", "context": "fine"}\n{oops\n'}
    r = api.post("/v1/documents", json={"documents": [notes, bad], "questions": qs}, headers=batch)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("bad.jsonl line 2: malformed JSON")
    assert not (home / "store.db").exists() or Store(home / "store.db").passages() == []
    wrong = {"name": "qa.jsonl", "content": json.dumps({"question": "Who?", "answer": "Nobody at all"}) + "\n"}
    r = api.post("/v1/documents", json={"documents": [notes], "questions": wrong}, headers=batch)
    assert r.status_code == 400 and "is not in any ingested passage" in r.json()["error"]["message"]
    r = api.post("/v1/documents", json={"documents": [notes, {"name": "-", "content": "Varn is an island."}],
                                        "questions": qs}, headers=batch)
    assert r.status_code == 201, r.text
    assert [(d["source"], d["questions"]) for d in r.json()["documents"]] == [("brisk.md", 1), ("-", 0)]
    assert api.post("/v1/documents", json={"documents": "nope"}, headers=batch).status_code == 400


# ------------------------------------------------------------------ views
def test_status_queue_adapters_and_forgetting_are_the_json_views_paged(api):
    api.learner.store.ingest([document(*VARN)])
    learn(api.learner)
    s = api.get("/v1/status").json()
    assert s["queue"]["done"] == 1 and s["active_adapter"] == api.learner.store.active_adapter_id(KNOWLEDGE)
    assert s["api"] == {"waiting": 0, "queue": 2, "max_tokens": 12}
    q = api.get("/v1/queue?state=done&limit=1").json()
    assert q["counts"]["done"] == 1 and [j["state"] for j in q["jobs"]] == ["done"]
    assert api.get("/v1/queue?state=nonsense").status_code == 400
    a = api.get("/v1/adapters?limit=1").json()
    assert a["total"] == 1 and [v["id"] for v in a["versions"]] == [a["active"]]
    assert api.get("/v1/adapters?limit=1&offset=1").json()["versions"] == []
    assert api.get("/v1/adapters?limit=x").status_code == 400
    f = api.get("/v1/forgetting?versions=5&passages=5").json()
    assert set(f) >= {"accuracy", "passages", "per_passage", "window"} and f["window"]["passages"] == 1


# ------------------------------------------------------------------ a real daemon
@pytest.mark.process
def test_a_real_daemon_serves_the_api_while_it_learns(home, tiny_dir):
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import openai

    from agent.api.client import read_address
    from agent.daemon.process import running
    from tests.helpers import REPO, cli_env, run_cli, seal_argv

    flags = ["--set", "daemon.wake_poll_s=0.2", "--set", "daemon.status_every_s=0.2", "--set", "schedule.policy=never",
             "--set", "api.queue=4", "--set", "api.max_tokens=8", "--set", "api.max_body_bytes=50000",
             "--set", "lora.epochs=4"]

    def cli(*args: str) -> list[str]:
        return seal_argv(home, tiny_dir, *flags, *args, verbose=False)

    run_cli(cli("daemon", "start"), timeout=120)
    try:
        where = read_address(Home(home))
        assert where and where["host"] == "127.0.0.1" and where["pid"] == running(Home(home))["pid"]
        url, token = where["url"], (home / "token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
        assert httpx.get(f"{url}/models", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401

        client = openai.OpenAI(base_url=url, api_key=token, max_retries=0)
        done = client.chat.completions.create(model="seal", messages=[{"role": "user", "content": "Hello?"}], max_tokens=4)
        assert done.choices[0].message.role == "assistant" and done.usage.completion_tokens <= 4
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="seal:base", messages=[{"role": "user", "content": "Hello?"}], max_tokens=4, stream=True)]
        assert len(pieces) >= 2

        def passages() -> int:
            return len(Store(home / "store.db").passages())

        # bad documents: a 4xx JSON error and the store unchanged
        too_big = httpx.post(f"{url}/documents?name=big.txt", content=b"x " * 40_000, headers=auth, timeout=10)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
        broken = httpx.post(f"{url}/documents?name=b.jsonl", content=b'{"title": "x", "context": "ok"}\n{oops\n',
                            headers=auth, timeout=10)
        assert broken.status_code == 400 and "b.jsonl" in broken.json()["error"]["message"]
        assert not (home / "store.db").exists() or passages() == 0

        # a document to learn, then 50 requests at once while it learns
        r = httpx.post(f"{url}/documents?name=varn.json", content=json.dumps(record(*VARN)).encode(), headers=auth,
                       timeout=30)
        assert r.status_code == 201, r.text

        def one(i: int) -> int:
            body = {"model": "seal", "messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 3,
                    "stream": i % 2 == 0}
            return httpx.post(f"{url}/chat/completions", json=body, headers=auth, timeout=120).status_code

        with ThreadPoolExecutor(50) as pool:
            codes = list(pool.map(one, range(50)))
        assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
        assert running(Home(home)) is not None  # none of it brought the daemon down
        deadline = time.monotonic() + 120
        while Store(home / "store.db").queue_summary()["done"] < 1:  # and learning went on
            assert time.monotonic() < deadline, (home / "logs" / "daemon.log").read_text()[-2000:]
            time.sleep(0.3)
        status = httpx.get(f"{url}/status", headers=auth, timeout=10).json()
        assert status["running"] and status["queue"]["done"] == 1 and status["active_adapter"]

        # `seal ingest` beside the daemon: the files are read here, checked and stored by the daemon's API
        notes, qa = home.parent / "brisk.md", home.parent / "qa.jsonl"
        notes.write_text("# Brisk\nBrisk is a river town. Its bridge was built in 1722.\n")
        qa.write_text(json.dumps({"question": "When was Brisk's bridge built?", "answer": "1722"}) + "\n")
        got = run_cli(cli("ingest", str(notes), "--questions", str(qa)))
        assert got.stdout.splitlines() == [f"new: {notes} 'Brisk': 1 passage(s), 1 question(s)",
                                           "ingested 1 document(s): 1 passage(s), 1 question(s) queued"]
        assert f"API: ingested {notes}: 1 passage(s), 1 question(s)" in (home / "logs" / "daemon.log").read_text()
        again = run_cli(cli("ingest", str(notes)), ok=False)
        assert again.returncode == 1 and again.stdout.startswith(f"duplicate: {notes}")
        assert "nothing new to ingest: 1 duplicate document(s)" in again.stderr

        # the views beside the daemon: the same data as its API serves
        q = json.loads(run_cli(cli("queue", "--json", "--all")).stdout)  # (it may be learning the second)
        assert sum(q["counts"].values()) == 2 and q["counts"]["done"] >= 1 and len(q["jobs"]) == 2
        versions = json.loads(run_cli(cli("history", "--json")).stdout)
        assert versions and versions[-1] == httpx.get(f"{url}/adapters", headers=auth, timeout=10).json()["versions"][-1]
        st = json.loads(run_cli(cli("daemon", "status", "--json")).stdout)
        assert st["running"] and "api" not in st and st["disk"]["total"] > 0 and st["api_url"] == url
        assert f"api:            {url}" in run_cli(cli("daemon", "status")).stdout
        assert set(json.loads(run_cli(cli("forgetting", "--json")).stdout)) >= {"per_passage", "window"}

        # `seal ask` beside the daemon asks its model: it loads none of its own
        ask = subprocess.run([sys.executable, "-X", "importtime", *cli("ask", "Where is Varn?", "--max-tokens", "4")[1:]],
                             cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert ask.returncode == 0, ask.stderr[-2000:]
        assert ask.stdout.strip() and " transformers\n" not in ask.stderr and " transformers.modeling_utils" not in ask.stderr
    finally:
        run_cli(cli("daemon", "stop"), ok=False, timeout=120)
    assert not (home / "api.json").exists()


# ------------------------------------------------------------------ the real model
@pytest.mark.real_model
def test_real_model_the_api_answers_from_what_it_learned_and_the_base_does_not(real_runtime, home):
    """One wake cycle (the default policy) on an invented passage, then the same
    question through the API: the active adapter names the fact, the base does not."""
    from adapters.lora import LoraConfig
    from adapters.registry import AdapterRegistry
    from agent.learner import Learner
    from agent.wake import WakeConfig
    from policies.config import PolicyConfig
    from policies.questions import answer_prompt
    from tests.helpers import INVENTED

    store = Store(home / "store.db")
    base_model = real_runtime.model
    learner = Learner(real_runtime, store, AdapterRegistry(home / "adapters", store), LoraConfig(), PolicyConfig(),
                      WakeConfig(track=False))  # the forgetting measurements are not this test's
    question = "What is the name of the only town on the Isle of Brenmoor?"
    try:
        store.ingest([document(*INVENTED[:2], [(question, "Quorrin")])])
        (report,) = learn(learner)
        assert report.outcome == "committed", report.reason
        ctx = context(Home(home), Config(), lambda: learner, threading.Lock())
        client = TestClient(build_app(ctx), headers={"Authorization": f"Bearer {ctx.token}"})
        answers = {}
        for model in ("seal", "seal:base"):
            r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 32, "messages": [
                {"role": "user", "content": answer_prompt(question, title=INVENTED[0])}]})
            assert r.status_code == 200, r.text
            answers[model] = r.json()["choices"][0]["message"]["content"]
        print(answers)
        assert "quorrin" in answers["seal"].lower()
        assert "quorrin" not in answers["seal:base"].lower()
        ctx.desk.close()
    finally:
        store.close()
        learner.model.unload()  # the session's model is shared: take the LoRA layers out again
        real_runtime.model = base_model


@pytest.mark.process
def test_bench_api_measures_asking_a_daemon_against_asking_alone(tmp_path, tiny_dir):
    out = tmp_path / "api.json"
    r = subprocess_run(["--model", str(tiny_dir), "bench", "api", "--repeat", "1", "--max-tokens", "4", "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(out.read_text())
    assert got["api_first_token_s"] > 0 and got["daemon_rss_mb"] > 0
    for key in ("ask_via_daemon", "ask_local"):
        assert got[key]["total_s"] > 0 and got[key]["peak_mb"] > 0
    # the daemon's model answers the one asked beside it: the process loads none of its own
    assert got["ask_via_daemon"]["peak_mb"] < got["ask_local"]["peak_mb"]
    assert "seal bench api" in r.stdout and "seal ask beside the daemon" in r.stdout


def subprocess_run(args: list[str]):
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env

    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------ where it listens
class _Idle:
    """What start_api needs of a daemon: its model lock, and no model loaded yet."""

    model_lock = threading.Lock()

    @staticmethod
    def loaded_learner():
        return None


def test_the_api_listens_on_loopback_unless_told_and_says_where(home):
    import httpx

    from agent.api.client import read_address
    from agent.api.service import ApiStartError, start_api

    public = dataclasses.replace(Config(), api=ApiConfig(host="0.0.0.0", port=0))
    with pytest.raises(ApiStartError, match="not loopback.*--public"):
        start_api(Home(home), public, _Idle())
    server = start_api(Home(home), dataclasses.replace(Config(), api=ApiConfig(port=0)), _Idle())
    try:
        where = read_address(Home(home))
        assert where["url"] == server.url and where["host"] == "127.0.0.1" and where["port"] > 0
        assert (home / "api.json").stat().st_mode & 0o777 == 0o600
        auth = {"Authorization": f"Bearer {ensure_token(Home(home))}"}
        r = httpx.post(f"{server.url}/chat/completions", json=_chat(), headers=auth, timeout=10)
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]  # no model yet
        taken = dataclasses.replace(Config(), api=ApiConfig(port=where["port"]))
        with pytest.raises(ApiStartError, match="could not listen"):
            start_api(Home(home), taken, _Idle())
    finally:
        server.stop()
    assert not (home / "api.json").exists()
