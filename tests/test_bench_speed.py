"""`seal bench speed` on a tiny random model: both runs end to end, the reference
trainer really is SEAL's (padded, loss on the padding, batch 1, a fresh Trainer per
trial, one question at a time), and the FLOP meter counts what torch's own counter
counts."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from adapters import lora
from adapters.names import KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from agent.bench.continual import _ingest
from agent.bench.meter import FlopMeter, attention_flops, attention_pairs, matmul_flops
from agent.bench.reference import reference_train
from agent.bench.speed import check_meter, measured_learner
from agent.learner import Learner
from agent.runtime import Runtime
from agent.wake import WakeConfig
from policies.config import PolicyConfig
from store import Store
from tests.helpers import FAST_LORA, PASSAGES, record, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "speed.json"
    path.write_text(json.dumps([record(*p) for p in PASSAGES]))
    return path


def _learner(tokenizer, tmp_path: Path, mode: str = "optimised", pad_to: int = 2048) -> Learner:
    runtime = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    (tmp_path / "adapters").mkdir(parents=True, exist_ok=True)
    store = Store(tmp_path / "store.db")
    _ingest(store, [record(*PASSAGES[0])])
    return measured_learner(runtime, (store, AdapterRegistry(tmp_path / "adapters", store)),
                            dataclasses.replace(FAST_LORA, lr=1e-3), PolicyConfig(), WakeConfig(answer_tokens=4),
                            mode, pad_to)


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_both_runs_end_to_end_write_every_step_and_show_prints_them(seal, tiny_dir, data_file, tmp_path):
    out = tmp_path / "speed.json"
    r = seal("--model", tiny_dir, "--set", "policies.self_edit=implications", "--set", "wake.self_edit_tokens=12",
             "--set", "wake.answer_tokens=4", "--set", "lora.rank=4",
             "bench", "speed", "--data", data_file, "--split", "all", "--candidates", "2", "--epochs", "1",
             "--pad-to", "64", "--matmul-size", "128", "--out", out)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["benchmark"] == "speed" and result["epochs"] == 1 and result["pad_to"] == 64
    assert result["same_self_edits"]  # same seed, same batched generation: the same self-edits
    assert result["matmul"]["peak"] > 0 and result["versions"]["torch"] == torch.__version__
    for mode in ("optimised", "reference"):
        m = result["modes"][mode]
        kinds = [s["kind"] for s in m["steps"]]
        for kind in ("questions", "baseline", "generate", "train", "score", "evaluate", "commit", "track"):
            assert kind in kinds, (mode, kinds)
        assert m["outcome"] == "committed"
        assert len(m["trials"]) == kinds.count("train") >= 2  # passage-only + at least one self-edit
        assert len(m["candidates"]) == 3 and sum(c["trained"] for c in m["candidates"]) == len(m["trials"])
        assert math.isclose(sum(s["seconds"] for s in m["steps"]), m["seconds"], rel_tol=0.02)
        train = [s for s in m["steps"] if s["kind"] == "train"]
        assert all(s["flops_backward"] > 0 and s["tokens"] > 0 for s in train)
        assert m["peak_rss_mb"] > 0
    opt, ref = (result["modes"][m] for m in ("optimised", "reference"))
    assert [s["label"] for s in opt["steps"] if s["kind"] == "train"] == \
        [s["label"] for s in ref["steps"] if s["kind"] == "train"]
    # same trials, same real tokens; the reference executes far more FLOPs (padding to 64, full logits)
    assert [t["tokens"] for t in opt["trials"]] == [t["tokens"] for t in ref["trials"]]
    flops = {m: sum(s["flops"] for s in result["modes"][m]["steps"] if s["kind"] == "train") for m in result["modes"]}
    assert flops["reference"] > flops["optimised"]
    for check in result["meter_check"].values():
        assert check["meter"] == check["flop_counter"]
    printed = r.output
    shown = seal("bench", "show", out)
    assert shown.exit_code == 0, shown.output
    for text in (printed, shown.output):
        assert max(len(line) for line in text.splitlines()) <= 80
        text = " ".join(text.split())
        assert "time per step" in text and "ref/opt" in text and "% of the measured matmul" in text
        assert "train 0: passage" in text and "same self-edits in both: yes" in text


@pytest.mark.parametrize("args, message", [
    (("--candidates", "0"), "--candidates must be at least 1"),
    (("--epochs", "0"), "--epochs must be at least 1"),
    (("--pad-to", "1"), "--pad-to must be at least 2"),
    (("--data", "/nonexistent/squad.json"), "no such file"),
    (("--shape", "gpt-5"), "--shape: unknown shape 'gpt-5'"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(seal, args, message):
    r = seal("bench", "speed", *args)
    assert r.exit_code == 1 and message in r.output
    assert len(r.output.strip().splitlines()) == 1


# ------------------------------------------------------------------ the reference
def test_reference_trainer_pads_puts_loss_on_padding_and_uses_batch_one(tokenizer, tmp_path):
    learner = _learner(tokenizer, tmp_path)
    model = learner.model
    seen, trainers = [], []

    def spy(_module, args, kwargs):
        if model.training:
            seen.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels") if k in kwargs})

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    examples = [lora.Example("", "The Isle of Varn lies in the Grey Sea."),
                lora.Example(learner.runtime.chat("Where is the Isle of Varn?"), "the Grey Sea", eos=True)]
    lora.copy_adapter(model, KNOWLEDGE, TRIAL)
    before = lora.snapshot(model, KNOWLEDGE)
    try:
        result = reference_train(model, tokenizer, examples, adapter=TRIAL, epochs=2, pad_to=48, seed=3,
                                 on_trainer=trainers.append)
    finally:
        handle.remove()
    assert len(trainers) == 1 and trainers[0].args.per_device_train_batch_size == 1
    assert trainers[0].args.learning_rate == 1e-3 and trainers[0].args.save_strategy == "no"
    assert len(seen) == result.steps == 4  # 2 examples x 2 epochs, one per step
    lengths = set()
    for batch in seen:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == (1, 48)  # every training input is padded to pad_to
        assert torch.equal(labels, ids)  # labels = input_ids: the padding carries loss
        n = int(mask.sum())
        assert n < 48 and mask[0, n:].eq(0).all() and labels[0, n:].ne(-100).all()
        lengths.add(n)
    assert len(lengths) == 2
    assert result.tokens == 2 * sum(lengths) and all(math.isfinite(v) for v in result.losses)
    after = lora.snapshot(model, KNOWLEDGE)
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the trial adapter trained
    assert not any(p.requires_grad for p in model.parameters())


def test_reference_learner_builds_a_fresh_trainer_per_trial_and_scores_one_question_at_a_time(
        tokenizer, tmp_path, monkeypatch):
    import transformers

    made = []

    class Recording(transformers.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(transformers, "Trainer", Recording)
    learner = _learner(tokenizer, tmp_path, "reference", pad_to=40)
    examples = [lora.Example("", "Brisk Tower stands in Amberlee.")]
    for seed in (1, 2):
        learner.trial(examples, seed)
    assert len(made) == 2 and made[0] is not made[1]
    assert made[0].model is made[1].model is learner.model  # the resident model, not a copy

    calls = {"generate": [], "loglik": []}
    rt = learner.runtime
    generate, loglik = rt.generate, rt.loglik
    monkeypatch.setattr(rt, "generate", lambda prompts, **kw: calls["generate"].append(len(prompts)) or generate(prompts, **kw))
    monkeypatch.setattr(rt, "loglik", lambda p, c, **kw: calls["loglik"].append(len(p)) or loglik(p, c, **kw))
    qs = learner.store.questions(1)
    s = learner.score(KNOWLEDGE, "Isle of Varn", qs)
    assert s.n == len(qs) == len(s.answers) == len(s.correct) == len(s.logprobs)
    assert calls == {"generate": [1] * len(qs), "loglik": [1] * len(qs)}


def test_scoring_one_question_at_a_time_gives_the_batched_scores(tokenizer, tmp_path):
    learner = _learner(tokenizer, tmp_path)
    qs = learner.store.questions(1)
    batched = learner.score(KNOWLEDGE, "Isle of Varn", qs)
    learner.score_batch = 1
    one_by_one = learner.score(KNOWLEDGE, "Isle of Varn", qs)
    assert one_by_one.n == batched.n == len(qs) > 1
    assert one_by_one.answers == batched.answers and one_by_one.correct == batched.correct
    assert math.isclose(one_by_one.accuracy, batched.accuracy) and math.isclose(one_by_one.f1, batched.f1)
    for a, b in zip(one_by_one.logprobs, batched.logprobs, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)  # one pass or a padded batch: float rounding only
    assert math.isclose(one_by_one.logprob, sum(one_by_one.logprobs) / len(qs))


# ------------------------------------------------------------------ counting FLOPs
@pytest.mark.parametrize("shape", [(5,), (2, 5)])
def test_the_meter_counts_a_linear_layer_as_2mnk_and_no_weight_gradient_when_frozen(shape):
    k, n = 7, 3
    m = math.prod(shape)
    layer = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(*shape, k, requires_grad=True)
    with FlopCounterMode(display=False) as counter, FlopMeter() as meter:
        layer(x).sum().backward()
    assert meter.forward == 2 * m * n * k and meter.backward == 2 * (2 * m * n * k)  # grad of input and of weight
    assert meter.total == counter.get_total_flops()
    layer.weight.requires_grad_(False)  # frozen: autograd runs no weight-gradient matmul
    with FlopCounterMode(display=False) as counter, FlopMeter() as meter:
        layer(x).sum().backward()
    assert meter.backward == 2 * m * n * k and meter.total == counter.get_total_flops()
    with torch.no_grad(), FlopMeter() as meter:
        layer(x)
    assert (meter.forward, meter.backward) == (2 * m * n * k, 0)
    assert torch.nn.functional.linear.__name__ == "linear"  # restored on exit


def test_attention_flops_are_torch_formulas_and_causal_counts_the_lower_triangle():
    q, k, v = (2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 5)
    fwd, bwd = attention_flops(q, k, v)
    assert fwd == sdpa_flop_count(q, k, v)
    assert bwd == sdpa_backward_flop_count((2, 4, 6, 5), q, k, v)
    assert attention_pairs(4, 4, causal=True) == 10 and attention_pairs(4, 4, causal=False) == 16
    assert attention_flops((1, 1, 4, 2), (1, 1, 4, 2), (1, 1, 4, 2), causal=True)[0] == 2 * 10 * 4


def test_the_meter_equals_torchs_counter_on_real_training_steps_of_both_kinds(tokenizer, tmp_path):
    learner = _learner(tokenizer, tmp_path)
    check = check_meter(learner, pad_to=32)
    for mode in ("optimised", "reference"):
        c = check[mode]
        assert c["meter"] == c["flop_counter"] > 0, (mode, c)
        assert any("attention" in op for op in c["ops"])  # the attention kernel was counted, not missed
        assert c["other"] < 0.05 * c["meter"]  # what the meter leaves out (rotary bmm) is small


def test_matmul_flops_is_a_positive_finite_rate():
    m = matmul_flops(n=64, reps=3, warmup=1)
    assert math.isfinite(m["best"]) and m["best"] > 0 and m["median"] <= m["best"]
    assert m["threads"] == torch.get_num_threads() == 1



# ------------------------------------------------------------------ the speed work
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_computes_what_nn_linear_computes(bias):
    from agent.runtime import FEW_ROWS, FewRowsLinear, use_few_rows_linear

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias))
    few = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias))
    few.load_state_dict(plain.state_dict())
    assert use_few_rows_linear(few) == 1 and type(few[0]) is FewRowsLinear
    for shape in [(1, 24), (2, 24), (1, FEW_ROWS, 24), (FEW_ROWS, 1, 24), (3, 5, 24)]:
        x = torch.randn(*shape, requires_grad=True)
        y0, y1 = plain(x), few(x)
        assert y1.shape == y0.shape and y1.is_contiguous()
        torch.testing.assert_close(y1, y0)
        (g0,) = torch.autograd.grad(y0.square().sum(), x)
        (g1,) = torch.autograd.grad(y1.square().sum(), x)
        torch.testing.assert_close(g1, g0)  # still trainable through


def test_a_cpu_runtime_uses_few_rows_linear_and_generates_as_before(tokenizer):
    from agent.runtime import FewRowsLinear

    plain = tiny_llama(tokenizer)
    rt = Runtime(tiny_llama(tokenizer), tokenizer, name="tiny")
    assert any(type(m) is FewRowsLinear for m in rt.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in rt.model.modules())
    before = Runtime.__new__(Runtime)  # the same weights without the change
    before.__dict__.update(rt.__dict__, model=plain)
    prompts = [rt.chat(f"Question {i}?") for i in range(3)]
    assert [g.text for g in rt.generate(prompts, max_new_tokens=8)] == \
        [g.text for g in before.generate(prompts, max_new_tokens=8)]


@pytest.mark.real_model
def test_a_shaped_model_has_the_architecture_of_the_real_one():
    """``--shape smollm2-135m`` is, randomly initialised, the default model's
    architecture (its config.json's sizes), so its speed is the real model's; a larger
    shape is larger."""
    from transformers import AutoConfig

    from agent.runtime import SHAPES, ModelConfig, resolve_model_dir, shaped_runtime

    cfg = ModelConfig(device="cpu")
    real = AutoConfig.from_pretrained(str(resolve_model_dir(cfg)[0]))
    assert SHAPES["smollm2-135m"] == (real.hidden_size, real.intermediate_size, real.num_hidden_layers,
                                      real.num_attention_heads, real.num_key_value_heads, real.tie_word_embeddings)
    shaped = shaped_runtime(cfg, "smollm2-135m")
    assert shaped.name == "random-smollm2-135m"
    assert shaped.model.config.vocab_size == real.vocab_size
    n = sum(p.numel() for p in shaped.model.parameters())
    assert 1.3e8 < n < 1.4e8
    bigger = shaped_runtime(cfg, "smollm2-360m")
    assert 3.5e8 < sum(p.numel() for p in bigger.model.parameters()) < 3.7e8
