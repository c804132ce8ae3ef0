"""SEAL's reference inner loop (``TTT_server.py`` of the SEAL code), for ``seal bench
speed`` to run beside seal's own: every training example padded to ``pad_to`` tokens
with ``labels = input_ids`` (the padding is not masked out of the loss), batch 1, a
fresh ``transformers.Trainer`` per trial at SEAL's learning rate."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable

import torch

from adapters import lora
from adapters.names import TRIAL

SEAL_LR = 1e-3  # SEAL's inner-loop learning rate (finetune_lr)


def reference_train(peft_model, tokenizer, examples: list[lora.Example], *, adapter: str, epochs: int,
                    pad_to: int = 2048, lr: float = SEAL_LR, seed: int = 0,
                    beat: Callable[[], None] | None = None,
                    on_trainer: Callable[[object], None] | None = None) -> lora.TrainResult:
    """Train ``adapter`` the way SEAL's inner loop does: each example tokenised (the
    same token ids as ``lora.train`` uses), cut and padded to ``pad_to`` tokens with
    ``labels = input_ids`` (the padding is attended to by no one but carries loss), one
    example per step, by a fresh ``transformers.Trainer`` (TrainingArguments as
    SEAL's: lr, batch 1, ``epochs``, no saving, no reporting; default optimiser and
    schedule). ``on_trainer`` sees the Trainer before it trains (tests)."""
    from transformers import (
        DataCollatorWithPadding,
        PrinterCallback,
        ProgressCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = []
    for seq in lora._encode(tokenizer, examples, pad_to):  # noqa: SLF001 - the same ids as lora.train
        ids = seq.ids
        fill = [pad] * (pad_to - len(ids))
        data.append({"input_ids": ids + fill, "attention_mask": [1] * len(ids) + [0] * len(fill),
                     "labels": ids + fill})  # SEAL: labels = input_ids, padding included
    real_tokens = sum(sum(d["attention_mask"]) for d in data)

    trainable = lora._lora_params(peft_model, adapter)  # noqa: SLF001
    wanted = {id(p) for p in trainable.values()}
    peft_model.set_adapter(adapter, inference_mode=True)
    for p in peft_model.parameters():
        p.requires_grad_(id(p) in wanted)

    class Beat(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if beat is not None:
                beat()

    device = next(peft_model.parameters()).device
    out_dir = tempfile.mkdtemp(prefix="seal-reference-")
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            args = TrainingArguments(
                output_dir=out_dir, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                num_train_epochs=epochs, learning_rate=lr, logging_steps=1, save_strategy="no",
                report_to=[], remove_unused_columns=False, seed=seed, disable_tqdm=True,
                use_cpu=device.type == "cpu", dataloader_pin_memory=False,
                bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
            )
            trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                              data_collator=DataCollatorWithPadding(tokenizer), callbacks=[Beat()])
            for cb in (PrinterCallback, ProgressCallback):  # seal prints only from its CLI
                trainer.remove_callback(cb)
            if on_trainer is not None:
                on_trainer(trainer)
            trainer.train()
            losses = tuple(float(h["loss"]) for h in trainer.state.log_history if "loss" in h)
            steps = trainer.state.global_step
    finally:
        for p in trainable.values():
            p.requires_grad_(False)
        peft_model.eval()
        shutil.rmtree(out_dir, ignore_errors=True)
    last = losses[-len(data):] if losses else (math.nan,)
    nan = not all(math.isfinite(v) for v in losses) or not losses
    return lora.TrainResult(steps=steps, tokens=real_tokens * epochs, seconds=time.perf_counter() - t0,
                            losses=losses, final_loss=sum(last) / len(last), nan=nan)


def reference_trainer(pad_to: int):
    """A ``Learner.train_fn`` that trains the way SEAL's inner loop does
    (``reference_train``); lora.train's signature, so the Learner needs nothing else."""

    def train(peft_model, tokenizer, examples, cfg: lora.LoraConfig, adapter: str = TRIAL,
              progress: Callable[[int, int, float], None] | None = None) -> lora.TrainResult:
        beat = (lambda: progress(0, 0, math.nan)) if progress is not None else None
        return reference_train(peft_model, tokenizer, examples, adapter=adapter, epochs=cfg.epochs, pad_to=pad_to,
                               seed=cfg.seed, beat=beat)

    return train
