"""Acting on history: `seal rollback`, `seal prune` and `seal export` keep the store
consistent (the active version's files exist and match their sha256; pruned rows are
marked, their files gone, the removal recorded) and refuse beside a running daemon;
an exported adapter loads with plain peft (and a merged export with plain
transformers) and gives the same answer log-likelihoods as inside seal."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from adapters import files, lora
from adapters.registry import AdapterRegistry
from agent.daemon.process import DaemonLock, pid_info
from agent.home import Home
from store import Store
from tests.helpers import FAST_LORA

pytestmark = pytest.mark.usefixtures("one_thread")


def make_version(home: Path, store: Store, version: int, kind: str = "wake", parent: int | None = None,
                 name: str = "knowledge", activate: bool = True) -> str:
    """A version whose folder holds bytes of its own (no model needed): rollback and
    prune only move pointers and files, and check sha256."""
    aid = f"{name}-{version:04d}"
    folder = home / "adapters" / aid
    folder.mkdir(parents=True)
    data = f"weights of {aid}".encode() * 100
    (folder / files.WEIGHTS_NAME).write_bytes(data)
    (folder / files.CONFIG_NAME).write_text('{"peft_type": "LORA"}')
    store.add_adapter({"id": aid, "name": name, "version": version, "kind": kind, "passage_id": None,
                       "parent_id": parent and f"{name}-{parent:04d}", "path": aid,
                       "sha256": hashlib.sha256(data).hexdigest(), "metrics": {}}, activate=activate)
    return aid


def consistent(home: Path, store: Store) -> None:
    """The store and the disk agree: every active version's files are there and match;
    every row not pruned has its folder; no pruned row has one."""
    for name, aid in store.active_adapters().items():
        row = store.adapter(aid)
        assert row["status"] == "committed" and row["name"] == name
        data = (home / "adapters" / row["path"] / files.WEIGHTS_NAME).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    for row in store.adapters():
        assert (home / "adapters" / row["path"]).is_dir() == (row["status"] != "pruned"), row["id"]


@pytest.fixture
def history(home):
    """v1-v6 wake, v7 a sleep of v6, v8-v10 wake; v9 active (v10 rolled back); an
    editor version e1 whose parent is none."""
    store = Store(home / "store.db")
    for v in range(1, 7):
        make_version(home, store, v, parent=v - 1 or None)
    make_version(home, store, 7, kind="sleep", parent=6)
    for v in range(8, 11):
        make_version(home, store, v, parent=v - 1)
    make_version(home, store, 1, kind="restem", name="editor")
    store.set_active("knowledge", "knowledge-0009")
    yield store
    store.close()


# ------------------------------------------------------------------ rollback
def test_rollback_moves_the_pointer_records_it_and_deletes_nothing(history, home, seal):
    files = sorted(p.name for p in (home / "adapters").iterdir())
    r = seal("rollback", "knowledge-0004")
    assert r.exit_code == 0, r.output
    assert "active knowledge version: knowledge-0004 (was knowledge-0009)" in r.stdout
    assert history.active_adapter_id("knowledge") == "knowledge-0004"
    status = {a["id"]: a["status"] for a in history.adapters("knowledge")}
    assert [v for v, s in status.items() if s == "rolled_back"] == [f"knowledge-{v:04d}" for v in range(5, 11)]
    (ev,) = history.events(kind="rollback")
    detail = json.loads(ev["detail"])
    assert detail["previous"] == "knowledge-0009" and detail["rolled_back"] == [
        f"knowledge-{v:04d}" for v in range(5, 10)]  # v10 was rolled back already
    assert history.events(kind="activate")[0]["id"] < ev["id"]
    assert sorted(p.name for p in (home / "adapters").iterdir()) == files  # nothing deleted
    consistent(home, history)
    # forward again, by version number; the active one: nothing to do
    r = seal("rollback", "9")
    assert r.exit_code == 0 and history.active_adapter_id("knowledge") == "knowledge-0009"
    r = seal("rollback", "v9")
    assert r.exit_code == 0 and "already the active" in r.stdout
    assert len(history.events(kind="rollback")) == 2
    consistent(home, history)


def test_rollback_refuses_damaged_files_and_a_running_daemon(history, home, seal):
    before = history.counts()
    (home / "adapters" / "knowledge-0003" / files.WEIGHTS_NAME).write_bytes(b"not the committed weights")
    r = seal("rollback", "knowledge-0003")
    assert r.exit_code == 1 and "does not match" in r.output and len(r.output.strip().splitlines()) == 1
    (home / "adapters" / "knowledge-0002" / files.WEIGHTS_NAME).unlink()
    r = seal("rollback", "knowledge-0002")
    assert r.exit_code == 1 and "missing" in r.output
    lock = DaemonLock(Home(home))
    lock.acquire(pid_info(Home(home)))
    try:
        r = seal("rollback", "knowledge-0005")
        assert r.exit_code == 1 and "a seal daemon runs on this home" in r.output
        r = seal("prune", "--keep", "1")
        assert r.exit_code == 1 and "a seal daemon runs on this home" in r.output
    finally:
        lock.release()
    assert history.counts() == before and history.active_adapter_id("knowledge") == "knowledge-0009"


def test_writers_refuse_beside_each_other_naming_the_holder(history, home, seal):
    """One writer per home: while another process (here: this one, through its own
    lock) writes, learn, sleep, rollback and prune each refuse with one line naming it,
    and change nothing; once it is gone, they run."""
    from agent.home import WriterLock

    before = history.counts()
    with WriterLock(Home(home), "learn"):
        for args in (("rollback", "knowledge-0005"), ("prune", "--keep", "1"), ("learn",), ("sleep",)):
            r = seal(*args)
            assert r.exit_code == 1, (args, r.output)
            assert f"`seal learn` (pid {os.getpid()}, since " in r.output and "is writing to" in r.output, r.output
            assert len(r.output.strip().splitlines()) == 1
    assert history.counts() == before and history.active_adapter_id("knowledge") == "knowledge-0009"
    r = seal("rollback", "knowledge-0005")
    assert r.exit_code == 0, r.output
    assert history.active_adapter_id("knowledge") == "knowledge-0005"
    r = seal("rollback", "knowledge-0005")  # the lock was given back when the command ended
    assert r.exit_code == 0 and "already the active" in r.output


# ------------------------------------------------------------------ prune
def test_prune_keeps_the_newest_the_active_sleeps_and_their_parents(history, home, seal):
    r = seal("prune", "--keep", "2", "--dry-run", "--json")
    assert r.exit_code == 0
    plan = json.loads(r.stdout)
    assert [x["id"] for x in plan["removed"]] == [f"knowledge-{v:04d}" for v in (1, 2, 3, 4, 5, 8)]
    assert plan["kept"] == {"knowledge-0006": "parent of knowledge-0007", "knowledge-0009": "active",
                            "knowledge-0010": "one of the 2 newest"}
    assert all((home / "adapters" / x["id"]).is_dir() for x in plan["removed"])  # a dry run removes nothing
    assert not history.events(kind="prune")

    r = seal("prune", "--keep", "2")
    assert r.exit_code == 0, r.output
    assert "removed 6 version(s)" in r.stdout and "knowledge-0008" in r.stdout
    status = {a["id"]: a["status"] for a in history.adapters()}
    assert {k for k, s in status.items() if s == "pruned"} == {f"knowledge-{v:04d}" for v in (1, 2, 3, 4, 5, 8)}
    assert status["knowledge-0007"] == "committed" and status["editor-0001"] == "committed"
    (ev,) = history.events(kind="prune")
    detail = json.loads(ev["detail"])
    assert [x["id"] for x in detail["removed"]] == [x["id"] for x in plan["removed"]]
    assert detail["bytes"] == sum(x["bytes"] for x in plan["removed"]) > 0 and detail["keep"] == 2
    consistent(home, history)
    # the lineage stays readable, and a pruned version cannot come back
    assert [a["id"] for a in history.adapter_history()][-1] == "knowledge-0001"
    r = seal("rollback", "knowledge-0003")
    assert r.exit_code == 1 and "was pruned" in r.output
    r = seal("prune", "--keep", "2")
    assert r.exit_code == 0 and "nothing to prune" in r.stdout
    assert len(history.events(kind="prune")) == 1
    r = seal("history")
    assert "knowledge-0003 -" in r.stdout and "knowledge-0009 *" in r.stdout


def test_prune_keep_zero_still_keeps_the_active_one(history, home):
    registry = AdapterRegistry(home / "adapters", history)
    plan = registry.prune(0)
    assert "knowledge-0009" not in {x["id"] for x in plan.remove}
    assert plan.kept == {"knowledge-0006": "parent of knowledge-0007", "knowledge-0009": "active"}
    consistent(home, history)


def test_keep_sleeps_prunes_old_checkpoints_and_then_their_parents(home, seal):
    """Months of sleeps: with --keep-sleeps N only the N newest checkpoints (and the
    versions they consolidated) stay, so the disk is bounded; later plans read only the
    rows still on disk."""
    store = Store(home / "store.db")
    for v in range(1, 9):  # v1 wake, v2 sleep of v1, v3 wake, v4 sleep of v3, ...
        make_version(home, store, v, kind="sleep" if v % 2 == 0 else "wake", parent=v - 1 or None)
    make_version(home, store, 9, parent=8)
    r = seal("prune", "--keep", "1", "--keep-sleeps", "1", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert [x["id"] for x in plan["removed"]] == [f"knowledge-{v:04d}" for v in range(1, 7)]
    assert plan["kept"] == {"knowledge-0007": "parent of knowledge-0008",
                            "knowledge-0008": "one of the 1 newest checkpoints", "knowledge-0009": "active"}
    consistent(home, store)
    assert {a["id"] for a in store.adapters_to_plan()} == {f"knowledge-{v:04d}" for v in (7, 8, 9)}
    r = seal("prune", "--keep", "1")  # the default keeps every checkpoint that is left
    assert r.exit_code == 0 and "nothing to prune" in r.stdout
    store.close()


def test_an_interrupted_prune_is_finished_by_the_next(history, home):
    registry = AdapterRegistry(home / "adapters", history)
    plan = registry.prune_plan(3)
    # the store transaction ran, then the process died before removing any folder
    history.mark_pruned([{"id": r["id"], "path": r["path"], "bytes": r["bytes"]} for r in plan.remove], {"keep": 3})
    assert all((home / "adapters" / r["path"]).is_dir() for r in plan.remove)
    again = registry.prune(3)
    assert {r["id"] for r in again.remove} == {r["id"] for r in plan.remove}
    consistent(home, history)
    with pytest.raises(ValueError, match="active"):
        history.mark_pruned([{"id": "knowledge-0009", "path": "knowledge-0009", "bytes": 1}], {})
    consistent(home, history)


# ------------------------------------------------------------------ export
def test_export_loads_with_plain_peft_and_scores_as_inside_seal(home, seal, tiny_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from agent.runtime import Runtime

    # inside seal: the tiny model from its folder, a knowledge adapter trained and committed
    rt = Runtime(AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer, name="tiny")
    cfg = dataclasses.replace(FAST_LORA, epochs=4, lr=5e-2)
    rt.model = lora.attach(rt.model, cfg, names=("knowledge",))
    lora.train(rt.model, tokenizer, [lora.Example("The capital of Varn is", " Kelmora.")] * 4, cfg, adapter="knowledge")
    store = Store(home / "store.db")
    aid = AdapterRegistry(home / "adapters", store).commit(
        rt.model, "knowledge", name="knowledge", kind="wake", parent_id=None, passage_id=None, policy="passage",
        reward=0.1, metrics={})
    prompts = ["The capital of Varn is", "Q: Who founded Varn?\nA:"]
    answers = [" Kelmora.", " Hedda Lune"]
    rt.model.set_adapter("knowledge")
    inside = [ll.total for ll in rt.loglik(prompts, answers)]
    with rt.model.disable_adapter():
        base = [ll.total for ll in rt.loglik(prompts, answers)]
    assert abs(inside[0] - base[0]) > 1e-3  # the adapter changes the answer's likelihood

    out = tmp_path / "exported"
    r = seal("--model", str(tiny_dir), "export", aid, "--to", str(out))
    assert r.exit_code == 0, r.output
    config = json.loads((out / files.CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir) and config["peft_type"] == "LORA"
    assert json.loads((out / "seal.json").read_text())["sha256"] == store.adapter(aid)["sha256"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out))
    outside = [ll.total for ll in Runtime(plain, tokenizer).loglik(prompts, answers)]
    assert outside == pytest.approx(inside, abs=1e-5)

    merged_dir = tmp_path / "merged"
    r = seal("--model", str(tiny_dir), "export", "v1", "--to", str(merged_dir), "--merged")
    assert r.exit_code == 0, r.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in k for k in merged.state_dict())  # a plain model: nothing of peft left
    got = [ll.total for ll in Runtime(merged, tokenizer).loglik(prompts, answers)]
    assert got == pytest.approx(inside, abs=1e-4)

    # a destination that is not empty is refused, and nothing in it changes
    r = seal("--model", str(tiny_dir), "export", aid, "--to", str(out))
    assert r.exit_code == 1 and "not empty" in r.output
    assert sorted(p.name for p in out.iterdir()) == [files.CONFIG_NAME, files.WEIGHTS_NAME, "seal.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-export-")]
    store.close()
