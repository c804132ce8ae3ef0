"""adapters/: LoRA attach/train/snapshot/save/load and the on-disk registry.

Fast tests build their own tiny random Llama (the session ``tiny_runtime`` is shared
with other tests, and attaching LoRA modifies a model in place)."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from adapters import files, lora
from adapters.lora import AdapterError, Example, LoraConfig
from adapters.registry import AdapterRegistry
from store import Store
from tests.helpers import FAST_LORA, tiny_llama

TEXT = (
    "The lighthouse of Quellport was built in 1843 by the engineer Ada Tennock. "
    "Its lamp burned whale oil until 1901, when it was fitted with an electric arc."
)
CFG = dataclasses.replace(FAST_LORA, epochs=4, batch_size=4, seed=0)


@pytest.fixture
def model(tokenizer):
    """A fresh tiny model with the ``knowledge`` and ``trial`` adapters."""
    return lora.attach(tiny_llama(tokenizer), CFG, names=("knowledge", "trial"))


def logits(m, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def base_state(m) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "bad", [{"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ()}, {"lr": 0.0}, {"lr": math.inf},
            {"epochs": 0}, {"batch_size": 0}, {"max_length": 1}, {"weight_decay": -1.0}, {"grad_clip": -1.0}],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="lora\\."):
        LoraConfig(**bad)


def test_config_fields_have_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(LoraConfig))


# ------------------------------------------------------------------------ attach
def test_attach_leaves_output_equal_to_base(tokenizer):
    base = tiny_llama(tokenizer)
    before = logits(base, tokenizer)
    m = lora.attach(base, CFG, names=("knowledge", "trial"))
    assert set(m.peft_config) == {"knowledge", "trial"} and m.active_adapter == "knowledge"
    assert torch.equal(logits(m, tokenizer), before)
    lora.add(m, CFG, "editor")
    assert not any(p.requires_grad for p in m.parameters())  # nothing trains until train()
    for name in ("trial", "editor"):
        m.set_adapter(name)  # note: peft's set_adapter also makes that adapter trainable
        assert torch.equal(logits(m, tokenizer), before)
    with pytest.raises(ValueError):
        lora.add(m, CFG, "editor")


def test_snapshot_keys_are_peft_state_dict_keys(model):
    from peft import get_peft_model_state_dict

    snap = lora.snapshot(model, "trial")
    assert snap.keys() == get_peft_model_state_dict(model, adapter_name="trial").keys()
    assert all(v.device.type == "cpu" and not v.requires_grad for v in snap.values())
    assert len(snap) == 2 * len(CFG.targets) * 2  # A and B, 7 targets, 2 layers


# ------------------------------------------------------------------------- train
def test_train_lowers_loss_and_changes_only_its_adapter(model, tokenizer):
    base, trial = base_state(model), lora.snapshot(model, "trial")
    knowledge = lora.snapshot(model, "knowledge")
    examples = [Example("", TEXT)]
    before = lora.example_losses(model, tokenizer, examples, CFG)[0]
    seen = []
    cfg = LoraConfig(**{**CFG.__dict__, "lr": 3e-2, "epochs": 10})
    r = lora.train(model, tokenizer, examples, cfg, adapter="knowledge", progress=lambda *a: seen.append(a))
    after = lora.example_losses(model, tokenizer, examples, CFG)[0]

    # a random 16-wide model is near-uniform over 49k tokens: the drop is small but real
    assert not r.nan and r.steps == cfg.epochs and len(r.losses) == r.steps
    assert after < before - 0.05 and r.losses[-1] < r.losses[0] - 0.05
    assert r.final_loss == pytest.approx(r.losses[-1])  # one step per epoch
    assert r.tokens == cfg.epochs * len(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert [s[:2] for s in seen] == [(i + 1, r.steps) for i in range(r.steps)]
    assert not same(lora.snapshot(model, "knowledge"), knowledge)
    assert same(lora.snapshot(model, "trial"), trial)
    assert same(base_state(model), base)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_train_the_trial_adapter_leaves_knowledge(model, tokenizer):
    knowledge = lora.snapshot(model, "knowledge")
    lora.train(model, tokenizer, [Example("", TEXT)], CFG, adapter="trial")
    assert model.active_adapter == "trial"
    assert same(lora.snapshot(model, "knowledge"), knowledge)
    assert not same(lora.snapshot(model, "trial"), knowledge)


@pytest.mark.slow
def test_training_is_reproducible(tokenizer):
    examples = [Example("", TEXT), Example("Q: who built it?\nA:", " Ada Tennock", eos=True), Example("", "Whale oil.")]
    cfg = LoraConfig(**{**CFG.__dict__, "batch_size": 2, "dropout": 0.1})
    runs = []
    for _ in range(2):
        m = lora.attach(tiny_llama(tokenizer), cfg)
        torch.manual_seed(123)  # the global RNG must not matter
        runs.append((lora.train(m, tokenizer, examples, cfg), lora.snapshot(m, "knowledge")))
        torch.rand(7)
    (r1, w1), (r2, w2) = runs
    assert r1.losses == r2.losses and same(w1, w2)
    m = lora.attach(tiny_llama(tokenizer), cfg)
    r3 = lora.train(m, tokenizer, examples, LoraConfig(**{**cfg.__dict__, "seed": 1}))
    assert r3.losses != r1.losses


def test_padding_does_not_change_the_loss(model, tokenizer):
    short = Example("Q: where?\nA:", " Quellport")
    long = Example("", TEXT * 3)
    alone = lora.example_losses(model, tokenizer, [short], CFG)
    batched = lora.example_losses(model, tokenizer, [short, long], CFG)
    assert batched[0] == pytest.approx(alone[0], abs=1e-5)
    assert batched[1] == pytest.approx(lora.example_losses(model, tokenizer, [long], CFG)[0], abs=1e-5)


def test_prompt_tokens_are_masked(model, tokenizer):
    prompt, completion = "Question: who built the lighthouse?\nAnswer:", " Ada Tennock"
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seqs = lora._encode(tokenizer, [Example(prompt, completion, eos=True)], 512)
    assert [(q.ids, q.start) for q in seqs] == [(p_ids + c_ids, len(p_ids))]
    batch = lora._collate(seqs, tokenizer.pad_token_id, "cpu")
    supervised = batch.targets[0][batch.targets[0] != lora.IGNORE].tolist()
    assert supervised == c_ids  # exactly the completion (with EOS), no prompt token

    # the loss is the mean log-loss of the completion tokens, computed by hand
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    by_hand = -logp[len(p_ids) - 1 :].gather(-1, torch.tensor(c_ids)[:, None]).mean()
    got = lora.example_losses(model, tokenizer, [Example(prompt, completion, eos=True)], CFG)[0]
    assert got == pytest.approx(float(by_hand), abs=1e-5)

    # plain text: every token but the first carries loss; long examples are cut
    (seq,) = lora._encode(tokenizer, [Example("", TEXT)], 8)
    assert len(seq.ids) == 8 and seq.start == 0 and lora._supervised(seq) == 7


def test_a_nan_loss_stops_training(model, tokenizer, monkeypatch):
    real = lora._batch_loss
    calls = []

    def flaky(scorer, batch):
        calls.append(1)
        loss = real(scorer, batch)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(lora, "_batch_loss", flaky)
    r = lora.train(model, tokenizer, [Example("", TEXT)], CFG)
    assert r.nan and r.steps == 3 and math.isnan(r.losses[-1]) and math.isnan(r.final_loss)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_a_diverging_update_is_caught(model, tokenizer):
    r = lora.train(model, tokenizer, [Example("", TEXT)], LoraConfig(**{**CFG.__dict__, "lr": 1e30, "epochs": 5}))
    assert r.nan and r.steps < 5


# --------------------------------------------------------------- snapshot / restore
def test_snapshot_restore_round_trip(model, tokenizer):
    lora.train(model, tokenizer, [Example("", TEXT)], CFG)
    snap = lora.snapshot(model, "knowledge")
    out = logits(model, tokenizer)
    lora.train(model, tokenizer, [Example("", "Something else entirely.")], CFG)
    assert not torch.equal(logits(model, tokenizer), out)
    lora.restore(model, "knowledge", snap)
    assert same(lora.snapshot(model, "knowledge"), snap)
    assert torch.equal(logits(model, tokenizer), out)
    with pytest.raises(AdapterError):
        lora.restore(model, "knowledge", {k: v for k, v in list(snap.items())[1:]})

    lora.copy_adapter(model, "knowledge", "trial")
    assert same(lora.snapshot(model, "trial"), snap)
    model.set_adapter("trial")
    assert torch.equal(logits(model, tokenizer), out)


# ---------------------------------------------------------------------- save / load
def test_save_is_a_standard_peft_dir(model, tokenizer, tmp_path):
    from peft import PeftModel

    lora.train(model, tokenizer, [Example("", TEXT)], CFG)
    model.set_adapter("knowledge")
    want = logits(model, tokenizer)
    dest = tmp_path / "adapters" / "knowledge-0001"
    sha = files.save(model, "knowledge", dest)

    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in dest.parent.iterdir()] == ["knowledge-0001"]  # no temp dir left
    import hashlib
    import json

    assert sha == hashlib.sha256((dest / "adapter_model.safetensors").read_bytes()).hexdigest()
    conf = json.loads((dest / "adapter_config.json").read_text())
    assert conf["inference_mode"] is True and conf["r"] == CFG.rank and conf["task_type"] == "CAUSAL_LM"

    fresh = PeftModel.from_pretrained(tiny_llama(tokenizer), dest)
    assert torch.allclose(logits(fresh, tokenizer), want, atol=1e-6)

    # same weights into another adapter of the live model, hash checked
    files.load(model, "trial", dest, expected_sha256=sha)
    assert same(lora.snapshot(model, "trial"), lora.snapshot(model, "knowledge"))
    with pytest.raises(AdapterError, match="sha256"):
        files.load(model, "trial", dest, expected_sha256="0" * 64)


def test_save_refuses_an_existing_dest_and_leaves_no_temp_dir(model, tmp_path, monkeypatch):
    dest = tmp_path / "a"
    dest.mkdir()  # even empty: os.rename would silently replace it
    with pytest.raises(FileExistsError):
        files.save(model, "knowledge", dest)

    def torn(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(files, "_write", torn)
    with pytest.raises(OSError, match="disk full"):
        files.save(model, "knowledge", tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_load_refuses_a_mismatched_adapter(model, tokenizer, tmp_path):
    other = lora.attach(tiny_llama(tokenizer), LoraConfig(rank=2, alpha=4))
    files.save(other, "knowledge", tmp_path / "r2")
    with pytest.raises(AdapterError, match="rank 2"):
        files.load(model, "knowledge", tmp_path / "r2")
    with pytest.raises(AdapterError, match="cannot read"):
        files.load(model, "knowledge", tmp_path / "missing")


# ------------------------------------------------------------------------ registry
@pytest.fixture
def registry(tmp_path):
    store = Store(tmp_path / "store.db")
    yield AdapterRegistry(tmp_path / "adapters", store)
    store.close()


def commit(reg, model, parent=None, **kw):
    args = dict(name="knowledge", kind="wake", parent_id=parent, passage_id=None, policy="implications",
                reward=0.5, metrics={"gain": 0.5})
    return reg.commit(model, "knowledge", **{**args, **kw})


def test_registry_commit_activate_list(model, tokenizer, registry):
    assert registry.active("knowledge") is None
    a = commit(registry, model)
    lora.train(model, tokenizer, [Example("", TEXT)], CFG)
    b = commit(registry, model, parent=a)
    assert (a, b) == ("knowledge-0001", "knowledge-0002")
    act = registry.active("knowledge")
    assert act["id"] == b and act["parent_id"] == a and act["metrics"] == {"gain": 0.5}
    assert act["status"] == "committed" and registry.path(b) == registry.root / b
    assert [r["id"] for r in registry.list("knowledge")] == [a, b] and registry.list("editor") == []

    registry.activate("knowledge", a)  # rollback
    assert registry.active("knowledge")["id"] == a and registry.get(b)["status"] == "rolled_back"
    event = registry.store.events(kind="activate")[0]
    assert '"previous": "knowledge-0002"' in event["detail"]
    assert commit(registry, model, parent=a) == "knowledge-0003"  # versions never reused
    with pytest.raises(AdapterError):
        registry.activate("editor", a)

    # load_into checks the hash recorded at commit
    registry.load_into(model, "trial", b)
    assert same(lora.snapshot(model, "trial"), lora.snapshot(model, "knowledge"))
    (registry.root / a / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterError, match="sha256"):
        registry.load_into(model, "trial", a)


def test_registry_recover_removes_only_unowned_folders(model, registry):
    a = commit(registry, model)
    (registry.root / ".tmp-x").mkdir()
    (registry.root / ".tmp-x" / "adapter_model.safetensors").write_bytes(b"half")
    files.save(model, "knowledge", registry.root / "knowledge-0099")  # renamed, never committed
    (registry.root / "notes.txt").write_text("a file, not a folder: left alone")
    assert registry.recover() == [".tmp-x", "knowledge-0099"]
    assert sorted(p.name for p in registry.root.iterdir()) == [a, "notes.txt"]
    assert registry.recover() == []


def test_a_ctrl_c_just_after_commit_keeps_the_committed_folder(model, registry, monkeypatch):
    """The interrupt lands after COMMIT, before commit() returns: the version is in the
    store and active, so its folder must stay (it used to be removed)."""
    add = registry.store.add_adapter

    def add_then_interrupt(*a, **kw):
        add(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.store, "add_adapter", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        commit(registry, model)
    assert registry.active("knowledge")["id"] == "knowledge-0001"
    assert registry.verify("knowledge-0001") is None and registry.recover() == []


def test_in_transaction_failure_rolls_back_everything(model, registry):
    a = commit(registry, model)
    before = registry.store.counts()

    def record(new_id):
        assert new_id == "knowledge-0002"
        registry.store.set_state("cycle.last", new_id)  # nested atomic(): a savepoint
        registry.store.log_event("cycle", {"adapter": new_id})
        raise RuntimeError("evaluation rows were bad")

    with pytest.raises(RuntimeError, match="evaluation rows"):
        commit(registry, model, parent=a, in_transaction=record)
    assert registry.store.counts() == before
    assert registry.store.get_state("cycle.last") is None
    assert registry.active("knowledge")["id"] == a and registry.get("knowledge-0002") is None
    assert sorted(p.name for p in registry.root.iterdir()) == [a]

    seen = []
    b = commit(registry, model, parent=a, in_transaction=lambda new_id: seen.append(registry.store.get_state("active.knowledge")))
    assert b == "knowledge-0002" and seen == [b]  # the pointer moves in the same transaction


# ---------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_model_learns_an_invented_fact(real_runtime):
    from agent.runtime import Runtime

    fact = (
        "The capital of the island nation of Veloria is Marnsk. Marnsk lies on the northern coast of "
        "Veloria, and it has been the capital of Veloria since 1821. Every government office of Veloria "
        "is in Marnsk, the largest city of the island."
    )
    rt = real_runtime
    base = rt.model
    model = lora.attach(base, LoraConfig(lr=1e-3, epochs=10, seed=0))
    try:
        scorer = Runtime(model, rt.tokenizer, name="lora", cfg=rt.cfg)
        prompt = rt.chat("What is the capital of Veloria? Answer with the name only.")
        (before,) = scorer.loglik([prompt], ["Marnsk"])
        t0 = time.perf_counter()
        r = lora.train(model, rt.tokenizer, [Example("", fact)], LoraConfig(lr=1e-3, epochs=10, seed=0))
        seconds = time.perf_counter() - t0
        (after,) = scorer.loglik([prompt], ["Marnsk"])
        print(f"train {seconds:.1f}s, loss {r.losses[0]:.2f} -> {r.final_loss:.2f}, "
              f"loglik(Marnsk) {before.total:.2f} -> {after.total:.2f}")
        assert not r.nan and r.final_loss < r.losses[0]
        assert after.total > before.total + 2.0  # e^2: over 7x more likely
    finally:
        model.unload()  # take the LoRA layers out again: the session's model is shared



def test_pad_batch_right_and_left():
    from adapters.batch import pad_batch

    ids, mask = pad_batch([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]] and mask.dtype == torch.long
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")
