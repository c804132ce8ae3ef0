"""`seal bench trl` on a tiny random model: seal's on-policy distillation trial and
TRL's SDFTTrainer both train on the same prompts (checked token for token), TRL on a
copy of the base model that leaves the runtime's own adapters alone, and the result
reads back and prints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapters import lora
from adapters.lora import LoraConfig
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from agent.bench.trl import plain_copy, run_trl
from agent.config import Config
from agent.runtime import Runtime
from agent.wake import WakeConfig
from policies.transfer import DistillConfig
from tests.helpers import SQUAD, make_learner, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

# seed 1: the tiny model's greedy answers are words (seed 0's are empty, and seal drops
# an empty answer's prompt, leaving nothing to distil)
TINY_SEED = 1
SHORT = ["--set", "model.threads=1", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "lora.epochs=2",
         "--set", "lora.lr=0.01", "--set", "distill.answer_tokens=8", "--set", "distill.entities=2",
         "--set", "wake.self_edit_tokens=16"]


def _cfg() -> Config:
    return Config(lora=LoraConfig(rank=4, alpha=8, epochs=2, lr=1e-2), distill=DistillConfig(answer_tokens=8, entities=2),
                  wake=WakeConfig(self_edit_tokens=16, answer_tokens=8))


def test_both_sides_train_on_the_same_prompts_and_the_result_has_its_shape(tokenizer):
    rt = Runtime(tiny_llama(tokenizer, seed=TINY_SEED), tokenizer, name="tiny")
    result = run_trl(rt, _cfg(), data_path=SQUAD, passages=1, seed=0, split="all")
    assert result["benchmark"] == "trl" and result["passages"] == len(result["rows"]) == 1
    (row,) = result["rows"]
    seal, trl = row["seal"], row["trl"]
    assert row["prompts"] > 0 and seal["answers"] > 0  # seal distilled its student's answers, not just the passage
    assert seal["examples"] == seal["answers"] + 1  # and the passage beside them (distill.keep_passage)
    assert seal["steps"] > 0 and seal["losses_finite"] and math.isfinite(seal["final_loss"])
    assert min(seal["generate_s"], seal["score_s"], seal["train_s"]) > 0 and seal["tokens"] > 0
    assert seal["adapter_max_abs_b"] > 0  # the trial adapter left its zero start
    # TRL ran as many optimizer steps as seal, on seal's prompts, and trained its adapter
    assert trl["steps"] == seal["steps"] == len(trl["losses"]) and result["same_steps"]
    assert trl["same_prompts"] and trl["rows"] == trl["steps"] * trl["rows_per_step"]
    assert trl["losses_finite"] and trl["train_s"] > trl["rollout_s"] > 0 and trl["generated_tokens"] > 0
    assert trl["adapter_max_abs_change"] > 0
    m = result["medians"]
    assert m["trl_s_per_step"] > 0 and m["seal_s_per_step"] > 0
    assert result["ratio_s_per_step"] == pytest.approx(m["trl_s_per_step"] / m["seal_s_per_step"])
    assert result["ratio_total"] == pytest.approx(m["trl_train_s"] / m["seal_total_s"])
    assert result["versions"]["trl"] and result["config"]["trl"]["distillation_mode"] == "topk_logits"
    assert result["config"]["trl"]["distillation_topk"] == 32 and result["config"]["trl"]["num_generations"] == 2
    assert json.loads(json.dumps(result)) == result  # JSON as it is
    # TRL trained a copy: the runtime's model carries seal's adapters only, its knowledge still the base
    assert set(rt.model.peft_config) == {KNOWLEDGE, TRIAL, EDITOR}
    knowledge = lora.snapshot(rt.model, KNOWLEDGE)
    assert all(torch.equal(knowledge[k], rt.model.seal_zero[k]) for k in knowledge)


def test_plain_copy_is_the_base_model_without_lora(tokenizer, tmp_path):
    learner = make_learner(tokenizer, tmp_path)  # the runtime's model is a PeftModel now
    copy = plain_copy(learner.model)
    assert not any("lora_" in n for n, _ in copy.named_parameters())
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad(), learner.model.disable_adapter():
        want = learner.model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=ids).logits, want)
    assert set(learner.model.peft_config) == {KNOWLEDGE, TRIAL, EDITOR}  # the original keeps its adapters


@pytest.fixture
def tiny_words_dir(tmp_path: Path, tokenizer) -> Path:
    folder = tmp_path / "tiny-model"
    tiny_llama(tokenizer, seed=TINY_SEED).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_command_writes_json_prints_the_table_and_show_prints_it_again(seal, tiny_words_dir, tmp_path):
    out = tmp_path / "trl.json"
    r = seal("--model", tiny_words_dir, *SHORT, "bench", "trl", "--data", SQUAD, "--split", "all",
             "--passages", "1", "--steps", "2", "--out", out)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["benchmark"] == "trl" and result["steps"] == 2 and result["rows"][0]["trl"]["steps"] == 2
    assert result["ratio_total"] is None or result["rows"][0]["seal"]["steps"] == 2  # totals: the same steps only
    shown = seal("bench", "show", out)
    assert shown.exit_code == 0, shown.output
    for text in (r.output, shown.output):
        assert max(len(line) for line in text.splitlines()) <= 80
        text = " ".join(text.split())
        assert "seal bench trl" in text and "trl/seal" in text and "token for token: yes" in text


def test_a_missing_data_file_is_one_line_and_a_non_zero_exit(seal):
    r = seal("bench", "trl", "--data", "/nonexistent/squad.json")
    assert r.exit_code == 1 and "no such file" in r.output
    assert len(r.output.strip().splitlines()) == 1
