"""agent.runtime: batched generation and scoring, chat prompts, model resolution.

Fast tests use the session's tiny random Llama (``tiny_runtime``); they only read it.
Tests marked ``real_model`` load SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from agent.runtime import ModelConfig, ModelError, Runtime
from tests.helpers import REPO

# Prompts of clearly different lengths, so that batches need padding.
PROMPTS = [
    "Hi",
    "The lighthouse of Quellport was built in 1843 by the engineer Ada Tennock.",
    "Question: what colour is the sky on a clear day? Answer in one word.",
    "Once upon a time",
]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------- generation
def test_sampled_generation_is_reproducible_for_a_seed(tiny_runtime):
    rt = tiny_runtime
    a = rt.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    b = rt.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.n_tokens for g in a] == [g.n_tokens for g in b]
    c = rt.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=8)
    # A random model over a 49k vocabulary: another seed gives other samples.
    assert [g.text for g in a] != [g.text for g in c]
    assert all(0 < g.n_tokens <= 8 for g in a)


def test_sampling_does_not_disturb_the_callers_rng(tiny_runtime):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_runtime.generate(PROMPTS[:2], max_new_tokens=4, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_batch_equals_each_prompt_alone(tiny_runtime):
    rt = tiny_runtime
    batched = rt.generate(PROMPTS, max_new_tokens=6)
    alone = [rt.generate([p], max_new_tokens=6)[0] for p in PROMPTS]
    assert [(g.text, g.n_tokens) for g in batched] == [(g.text, g.n_tokens) for g in alone]
    # batch_size smaller than the batch: the same, in the caller's order
    small = rt.generate(PROMPTS, max_new_tokens=6, batch_size=3)
    assert [g.text for g in small] == [g.text for g in batched]


def test_loglik_of_a_batch_equals_each_pair_alone(tiny_runtime):
    rt = tiny_runtime
    conts = [" there", " It still stands.", " Blue", " there was a fox who lived in a hole"]
    batched = rt.loglik(PROMPTS, conts)
    for p, c, b in zip(PROMPTS, conts, batched, strict=True):
        (one,) = rt.loglik([p], [c])
        assert b.n_tokens == one.n_tokens == rt.n_tokens(c)
        assert b.total == pytest.approx(one.total, abs=1e-4)
        assert b.mean == pytest.approx(b.total / b.n_tokens)
    assert all(b.total < 0 for b in batched)
    assert [b.total for b in rt.loglik(PROMPTS, conts, batch_size=2)] == pytest.approx(
        [b.total for b in batched], abs=1e-4
    )


def test_loglik_matches_a_plain_forward_pass(tiny_runtime):
    """The boundary between prompt and continuation is exact: the sum of the
    continuation's token log-probabilities, from one unpadded forward pass."""
    rt = tiny_runtime
    p_ids = rt.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    c_ids = rt.tokenizer(" It still stands.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(rt.model(input_ids=ids).logits[0].float(), dim=-1)
    want = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(c_ids))
    (got,) = rt.loglik([PROMPTS[1]], [" It still stands."])
    assert got.total == pytest.approx(want, abs=1e-4)


def test_chat_uses_the_chat_template(tiny_runtime):
    rt = tiny_runtime
    prompt = rt.chat("What is 2 + 2?")
    want = rt.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == want
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    with_system = rt.chat("Hello", system="You are terse.")
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in with_system
    assert with_system.index("You are terse.") < with_system.index("Hello")


# ------------------------------------------------------------------ model resolution
def _one_line(message: str) -> None:
    assert message and "\n" not in message, repr(message)


def test_missing_model_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as e:
        Runtime.load(ModelConfig(path=str(tmp_path / "nope")))
    _one_line(str(e.value))


def test_a_file_that_is_not_gguf_is_a_one_line_error(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="not a .gguf file") as e:
        Runtime.load(ModelConfig(path=str(f)))
    _one_line(str(e.value))


def test_a_folder_without_config_json_is_a_one_line_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json") as e:
        Runtime.load(ModelConfig(path=str(tmp_path)))
    _one_line(str(e.value))


def test_a_corrupt_gguf_file_is_a_one_line_error(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelError) as e:
        Runtime.load(ModelConfig(path=str(f), cache_dir=str(tmp_path / "cache")))
    _one_line(str(e.value))


@pytest.mark.process
def test_cli_with_a_missing_model_prints_one_error_line(home):
    """Through a real process: exit status 1, one 'Error:' line, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--home", str(home), "--model", "/nonexistent", "ask", "hi"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0
    assert r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ") and "/nonexistent" in lines[0]
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------ a local HF model folder
def test_load_a_local_hf_model_folder(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    rt = Runtime.load(ModelConfig(path=str(folder), device="cpu"))
    assert rt.name == "tiny-llama"
    assert rt.device.type == "cpu"
    assert next(rt.model.parameters()).dtype == torch.float32
    assert not rt.model.training
    (gen,) = rt.generate([rt.chat("Hello?")], max_new_tokens=5)
    assert 0 < gen.n_tokens <= 5
    (ll,) = rt.loglik([rt.chat("Hello?")], ["Hi"])
    assert ll.n_tokens >= 1 and ll.total < 0


# ------------------------------------------------------------------ the real model
@pytest.mark.real_model
def test_real_model_knows_the_capital_of_france(real_runtime):
    rt = real_runtime
    (gen,) = rt.generate([rt.chat("What is the capital of France?")], max_new_tokens=24)
    assert "paris" in gen.text.lower(), gen.text


@pytest.mark.real_model
def test_seal_ask_prints_an_answer(seal, home):
    r = seal("ask", "What is the capital of France?", "--max-tokens", "24")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()
    assert not (home / "store.db").exists()  # asking stores nothing
