"""The one training loop: AdamW (no weight decay on biases and norms), linear warmup then linear
decay, epochs with a dev evaluation after each, the best epoch kept, seeds, autocast on GPU.

A run folder (`config.output_dir`) holds: `config.json` (the FinetuneConfig), `metrics.jsonl`
(one line per epoch), `model/` (the best epoch: config.json, model.safetensors, tokenizer files, the
model code; loadable by `ForSequenceClassification.from_pretrained` and by transformers'
`AutoModelForSequenceClassification` with `trust_remote_code=True`), `predictions/` (test sets, GLUE
server format) and `result.json`, written last and atomically: a run is done when it exists.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.files import write_json_atomic
from common.optim import lr_scheduler, param_groups
from finetune import metrics
from finetune.config import FinetuneConfig
from finetune.data import Encoded, read_split
from finetune.errors import FinetuneError
from finetune.files import fixed_subset, task_of
from finetune.model import Runner, load, release_digest
from finetune.submission import FINETUNE_FILE, predict_tests
from finetune.tasks import Task
from hypermixer.hf.release import tokenizer_files

RESULT_FILE = "result.json"


class DivergedError(FinetuneError):
    """The training loss became NaN or infinite: the run cannot give a model."""


def train(config: FinetuneConfig, progress: bool | None = None) -> dict:
    """Fine-tune, evaluate on dev after each epoch, keep the best epoch; returns (and writes) the result.
    progress: tqdm bar per epoch; None = only on a terminal."""
    started = time.perf_counter()
    # Data and model first: a bad input stops the run before its folder is touched.
    task = task_of(config)
    source = dict(glue_dir=config.glue_dir, hf_dataset=config.hf_dataset)
    train_examples = read_split(task, task.train, **source)
    if config.max_train_examples is not None and config.max_train_examples < len(train_examples):
        if task.files is not None:  # the same subset for every seed
            train_examples = fixed_subset(train_examples, config.max_train_examples)
        else:
            pick = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(config.seed))
            train_examples = train_examples.subset(sorted(pick[: config.max_train_examples].tolist()))
    dev_examples = {ev.name: read_split(task, ev.dev, **source) for ev in task.evals if ev.dev is not None}
    if config.predict_test and task.files is not None:  # a bad --test-file stops the run before training
        for ev in task.evals:
            if ev.test.files:
                read_split(task, ev.test)
    seed_everything(config.seed)
    weights_sha256 = release_digest(config.release, config.from_scratch)  # the weights this run starts from
    runner = load(
        config.release,
        task.num_labels,
        config.from_scratch,
        config.max_seq_len,
        config.device,
        config.precision,
        config.extend_positions,
        config.long_inputs,
        config.window_stride,
        config.dropout,
    )
    train_data = runner.encode(train_examples)
    dev_data = {name: runner.encode(examples) for name, examples in dev_examples.items()}
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).unlink(missing_ok=True)
    write_json_atomic(out / "config.json", config.to_dict())
    windows = f" ({len(train_data)} windows)" if train_data.documents is not None else ""
    _log(
        f"{task.name}: {train_data.num_documents} training examples{windows}, "
        f"dev {', '.join(f'{k} {v.num_documents}' for k, v in dev_data.items())}; "
        f"{runner.config.mixer} from {config.release}{' (random init)' if config.from_scratch else ''} "
        f"on {runner.device} ({runner.precision})"
    )

    optimizer = make_optimizer(runner.model, config.learning_rate, config.weight_decay, config.adam_eps)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    scheduler = lr_scheduler(
        optimizer, round(config.warmup_ratio * steps_per_epoch * config.epochs), steps_per_epoch * config.epochs
    )
    scaler = torch.amp.GradScaler(runner.device.type, enabled=runner.amp_dtype == torch.float16)
    shuffle = torch.Generator().manual_seed(config.seed)

    history, best, best_state = [], None, None
    (out / "metrics.jsonl").write_text("")
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        loss = train_epoch(
            runner,
            train_data,
            config,
            optimizer,
            scheduler,
            scaler,
            shuffle,
            desc=f"{task.name} epoch {epoch}/{config.epochs}",
            progress=progress,
        )
        train_seconds = time.perf_counter() - epoch_start  # the training pass alone, without the dev evaluation
        if not math.isfinite(loss):  # a diverged run: no epoch after this one can be trusted
            raise DivergedError(f"diverged: the training loss is {loss} in epoch {epoch} (lr {config.learning_rate:g})")
        dev = evaluate(runner, task, dev_data, config.eval_batch_size)
        score = metrics.task_score(dev)
        record = {
            "epoch": epoch,
            "train_loss": loss,
            "dev": dev,
            "score": score,
            "seconds": round(time.perf_counter() - epoch_start, 2),
            "train_seconds": round(train_seconds, 3),
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(record)
        with open(out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        improved = best is None or score > best["score"]
        if improved:
            best = record
            # A CPU copy, not a file per improvement: one write at the end.
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in runner.model.state_dict().items()}
        _log(
            f"{task.name} epoch {epoch}/{config.epochs}: train loss {loss:.4f}, dev {_format(dev)}"
            f"{' (best)' if improved else ''} [{record['seconds']:.0f} s]"
        )

    runner.model.load_state_dict(best_state)
    if config.save_model:
        try:  # tokenizer.json + the side files transformers' AutoTokenizer reads, when they can be made
            extra = tokenizer_files(config.release, runner.config.max_seq_len)
        except ValueError:  # a tokenizer without BERT-style special tokens nor side files: tokenizer.json alone
            extra = {"tokenizer.json": (Path(config.release) / "tokenizer.json").read_text()}
        extra[FINETUNE_FILE] = json.dumps(finetune_info(task, config, runner.max_len), indent=2) + "\n"
        runner.model.save_pretrained(out / "model", extra_files=extra)
    predictions = []
    if config.predict_test:
        predictions = predict_tests(runner, task, out / "predictions", batch_size=config.eval_batch_size, **source)
    result = {
        "task": task.name,
        "metrics": list(task.metrics),
        "score": best["score"],
        "dev": best["dev"],
        "best_epoch": best["epoch"],
        "history": history,
        "labels": None if task.labels is None else list(task.labels),  # label id i is labels[i]
        "train_examples": train_data.num_documents,
        "train_tokens_per_epoch": len(train_data.tokens),  # real tokens (no padding), special tokens included
        "skipped_rows": train_examples.skipped,
        "model_dir": "model" if config.save_model else None,
        "predictions": [p.name for p in predictions],
        "device": str(runner.device),
        "precision": runner.precision,
        "parameters": sum(p.numel() for p in runner.model.parameters()),
        "release_sha256": weights_sha256,
        "seconds": round(time.perf_counter() - started, 2),
        "config": config.to_dict(),
    }
    write_json_atomic(out / RESULT_FILE, result)
    return result


def train_epoch(
    runner: Runner,
    data: Encoded,
    config: FinetuneConfig,
    optimizer,
    scheduler,
    scaler,
    shuffle: torch.Generator,
    desc: str,
    progress: bool | None,
) -> float:
    """One pass over the shuffled training set; returns the mean training loss."""
    model = runner.model
    model.train()
    order = torch.randperm(len(data), generator=shuffle)
    steps = math.ceil(len(data) / config.batch_size)
    total = torch.zeros((), device=runner.device)  # summed on the device: no sync per step
    bar = tqdm(
        runner.batches(data, config.batch_size, order),
        total=steps,
        desc=desc,
        unit="step",
        disable=None if progress is None else not progress,
        leave=False,
        file=sys.stderr,
    )
    for step, (_, batch) in enumerate(bar, start=1):
        with runner.autocast():
            loss = model(**runner.inputs(batch)).loss
        scaler.scale(loss).backward()
        if config.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.detach()
        if step % 20 == 0 or step == steps:
            bar.set_postfix(loss=f"{total.item() / step:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
    return total.item() / steps


def evaluate(runner: Runner, task, dev_data: dict[str, Encoded], batch_size: int) -> dict[str, dict[str, float]]:
    """{eval set: {metric: value}} on the labelled dev sets, one prediction per document."""
    return {
        name: metrics.compute(task.metrics, data.document_labels.numpy(), runner.predict(data, batch_size).numpy())
        for name, data in dev_data.items()
    }


def finetune_info(task: Task, config: FinetuneConfig, max_len: int) -> dict:
    """What a fine-tuned model folder records besides the model: the task (for a task from files,
    its labels and columns, so predictions map back), the length and how long inputs were read."""
    info: dict = {"task": task.name, "max_seq_len": max_len}
    if config.long_inputs != "truncate":
        info.update(long_inputs=config.long_inputs, window_stride=config.window_stride)
    if task.files is not None:
        info["labels"] = None if task.labels is None else list(task.labels)
        info.update(text_field=config.text_field, text_pair_field=config.text_pair_field, id_field=config.id_field)
    return info


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, eps=eps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _format(dev: dict[str, dict[str, float]]) -> str:
    return "; ".join(
        f"{name} " + ", ".join(f"{metrics.DISPLAY[m]} {100 * v:.2f}" for m, v in values.items())
        for name, values in dev.items()
    )


def _log(message: str) -> None:
    print(f"finetune: {message}", file=sys.stderr, flush=True)
