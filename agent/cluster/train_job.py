"""A LoRA training job in processes of its own: data-parallel training over several GPUs.

The sleep's consolidation trains one adapter on the replayed examples; with
``sleep.processes`` > 1 it runs as this job instead of in the daemon's model, one
process per GPU, under ``torchrun`` (what ``accelerate launch --multi_gpu`` runs; each
process finds its rank through accelerate's ``PartialState``, which also sets up the
process group: NCCL on GPUs, gloo on CPUs):

    python -m torch.distributed.run --standalone --nproc_per_node N -m agent.cluster.train_job JOB
    accelerate launch --multi_gpu --num_processes N -m agent.cluster.train_job JOB

``JOB`` is a folder: ``job.json`` (its kind, the model, the LoRA config, the parent
adapter's checksum), the data and the parent adapter folder ``parent/``. Every
process loads the model and the parent (sha256 checked) and trains it:

- ``lora`` (the sleep's consolidation): ``examples.pt``, the training examples with
  their teacher targets, trained with ``lora.train(..., distributed=True)``: the same
  batches, each process a share of each, gradients summed, so the weights equal a
  single process's.
- ``sft`` (the editor's ReST-EM step): ``rows.json``, prompt-completion rows, trained
  with trl's SFTTrainer (``agent.editor.sft_model``), which runs on DDP under
  torchrun: each step's rows split between the processes, the loss averaged over all
  their tokens.

Process 0 writes the trained adapter to ``JOB/adapter`` (a PEFT
folder, written atomically) and ``result.json`` (its sha256 and the training figures)
last, so a job that died has no result. The daemon reads the result and loads the
adapter, checksum checked; the job never touches the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters import files, lora
from adapters.names import KNOWLEDGE

from ..runtime import ModelConfig, Runtime

RESULT = "result.json"


class JobError(RuntimeError):
    """The job could not run or did not finish."""


def _new_job(folder: Path, kind: str, model: ModelConfig, lora_cfg: lora.LoraConfig, peft_model, adapter: str,
             **extra) -> Path:
    """The job folder with its parent (``adapter`` of ``peft_model`` as it is now) and
    ``job.json``; a folder an interrupted job left at the same place is replaced."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sha = files.save(peft_model, adapter, folder / "parent")
    spec = {"kind": kind, "model": dataclasses.asdict(model), "lora": dataclasses.asdict(lora_cfg),
            "parent_sha256": sha, **extra}
    (folder / "job.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return folder


def write_job(folder: Path, model: ModelConfig, lora_cfg: lora.LoraConfig, examples: list[lora.Example],
              peft_model, adapter: str) -> Path:
    """A job that trains a copy of ``adapter`` (of ``peft_model``, as it is now) on
    ``examples``."""
    folder = _new_job(folder, "lora", model, lora_cfg, peft_model, adapter)
    torch.save([dataclasses.asdict(e) for e in examples], folder / "examples.pt")
    return folder


def write_sft_job(folder: Path, model: ModelConfig, lora_cfg: lora.LoraConfig, rows: list[dict], editor_cfg,
                  peft_model, adapter: str) -> Path:
    """A job that fine-tunes a copy of ``adapter`` on prompt-completion ``rows`` with
    the editor's SFT (``editor_cfg``: an ``agent.editor.EditorConfig``)."""
    folder = _new_job(folder, "sft", model, lora_cfg, peft_model, adapter, editor=dataclasses.asdict(editor_cfg))
    (folder / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    return folder


def _examples(folder: Path) -> list[lora.Example]:
    out = []
    for d in torch.load(folder / "examples.pt", weights_only=False):
        t = d.get("teacher")
        teacher = lora.Teacher(**t) if isinstance(t, dict) else t
        out.append(lora.Example(**{**d, "teacher": teacher}))
    return out


def run_job(folder: Path) -> dict | None:
    """This process's part of the job (see the module docstring); process 0 returns
    the result it wrote, the others None."""
    from accelerate import PartialState

    folder = Path(folder)
    spec = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    state = PartialState(cpu=not torch.cuda.is_available())
    model_cfg = ModelConfig(**{**spec["model"], "device": str(state.device)})
    lora_cfg = lora.LoraConfig(**{**spec["lora"], "targets": tuple(spec["lora"]["targets"])})
    runtime = Runtime.load(model_cfg)
    peft_model = lora.attach(runtime.model, lora_cfg, names=(KNOWLEDGE,))
    files.load(peft_model, KNOWLEDGE, folder / "parent", expected_sha256=spec["parent_sha256"])
    if spec.get("kind", "lora") == "sft":
        out = _sft(folder, spec, peft_model, runtime.tokenizer, state.num_processes)
    else:
        result = lora.train(peft_model, runtime.tokenizer, _examples(folder), lora_cfg, adapter=KNOWLEDGE,
                            distributed=state.num_processes > 1)
        out = {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
               "losses": list(result.losses), "final_loss": result.final_loss, "nan": result.nan}
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    out |= {"processes": state.num_processes,
            "sha256": None if out["nan"] else files.save(peft_model, KNOWLEDGE, folder / "adapter")}
    tmp = folder / (RESULT + ".tmp")
    tmp.write_text(json.dumps(out), encoding="utf-8")
    os.replace(tmp, folder / RESULT)  # last: a job with a result finished
    return out


def _sft(folder: Path, spec: dict, peft_model, tok, processes: int) -> dict:
    from ..editor import EditorConfig, sft_model

    cfg = EditorConfig(**spec["editor"])
    rows = json.loads((folder / "rows.json").read_text(encoding="utf-8"))
    res = sft_model(peft_model, tok, rows, cfg, KNOWLEDGE, processes=processes)
    return {"steps": res.steps, "losses": list(res.losses), "train_loss": res.train_loss,
            "seconds": res.seconds, "stopped": res.stopped, "nan": not math.isfinite(res.train_loss)}


def launch(folder: Path, processes: int, *, should_stop: Callable[[], bool] = lambda: False,
           poll_s: float = 0.5) -> dict:
    """Run the job in ``processes`` processes (torchrun, standalone) and return its
    result. ``should_stop`` is polled: when it turns true the processes are killed and
    JobError raised. A job that exits without a result raises JobError with its last
    output line."""
    folder = Path(folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "agent.cluster.train_job", str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    project = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = project + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(folder / "job.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                if should_stop():
                    raise JobError("stop requested: training job killed")
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                _stop(proc)
    result = folder / RESULT
    if proc.returncode != 0 or not result.is_file():
        lines = (folder / "job.log").read_text(errors="replace").strip().splitlines()
        errors = [ln for ln in lines if "Error: " in ln and not ln.startswith(" ")]  # a traceback's last line
        why = errors[0] if errors else (lines[-1] if lines else "no output")
        raise JobError(f"training job exited with status {proc.returncode}: {why.strip()}")
    return json.loads(result.read_text(encoding="utf-8"))


def train_into(folder: Path, processes: int, peft_model, adapter: str, *,
               should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Run the job (``launch``) and load its adapter into ``adapter`` of ``peft_model``,
    checksum checked (a job whose loss was not finite leaves ``adapter`` as it was).
    The job's folder is removed afterwards, and its parent folder when that is empty."""
    folder = Path(folder)
    try:
        out = launch(folder, processes, should_stop=should_stop)
        if out["sha256"] is not None:
            files.load(peft_model, adapter, folder / "adapter", expected_sha256=out["sha256"])
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop torchrun and its workers: SIGTERM, which torchrun passes on to the workers
    it started (each in a session of its own), then SIGKILL for whatever is left. A
    worker whose torchrun is gone exits by itself (``_exit_with_parent``)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A daemon thread that ends this process when its parent (torchrun) is gone, so
    that no training worker outlives its job, however the job was stopped."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


if __name__ == "__main__":
    _exit_with_parent()
    run_job(Path(sys.argv[1]))
