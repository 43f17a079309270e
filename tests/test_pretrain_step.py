"""pretrain.step on DeepSpeed's real engine (CPU, gloo): host reads per optimizer step, the loss as the
mean over all of a step's masked tokens whatever the accumulation and world size, non-finite steps."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from common.net import free_port
from common.optim import param_groups
from hypermixer import EncoderConfig, ForMaskedLM, max_predictions_per_seq
from pretrain.step import NonFiniteGuard, NonFiniteLossError, train_step

SEQ, VOCAB, SEQUENCES = 16, 60, 16
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


def _model() -> ForMaskedLM:
    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_seq_len=SEQ,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = ForMaskedLM(config)
    model.max_predictions = max_predictions_per_seq(SEQ, 0.15)
    return model


def _sequences() -> list[dict[str, torch.Tensor]]:
    """16 sequences with 1 to 8 masked tokens each: micro-batches' token counts differ a lot."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (SEQUENCES, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    for row in range(SEQUENCES):
        picked = torch.randperm(SEQ, generator=g)[: 1 + (row * 5) % 8]
        labels[row, picked] = ids[row, picked]
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]} for i in range(SEQUENCES)
    ]


def _micro_batches(rows: list[dict[str, torch.Tensor]], micro: int):
    for start in range(0, len(rows), micro):
        yield {k: torch.stack([r[k] for r in rows[start : start + micro]]) for k in rows[0]}


def _engine(model: torch.nn.Module, micro: int, grad_accum: int, world: int, stage: int):
    import deepspeed

    config = {
        "train_batch_size": micro * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0,
        # eps 1 makes the first AdamW update about lr * gradient, linear in it: with a small eps a
        # gradient element near zero flips its update between -lr and +lr on rounding alone.
        "optimizer": {"type": "AdamW", "params": {"lr": 1.0, "eps": 1.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2**62,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=config)
    return engine


@contextmanager
def _process_group(rank: int = 0, world: int = 1, port: int | None = None):
    """A gloo group for DeepSpeed. In the pytest process: one single-rank group, made once and kept
    (DeepSpeed caches its groups, so a second init in one process would not be seen)."""
    if world == 1 and dist.is_initialized():
        yield
        return
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()),
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield


def _one_step(rank: int, world: int, micro: int, grad_accum: int, stage: int) -> dict[str, torch.Tensor]:
    model = _model()
    engine = _engine(model, micro, grad_accum, world, stage)
    rows = _sequences()
    share = len(rows) // world  # each rank takes a contiguous share, cut into its micro-batches
    batches = _micro_batches(rows[rank * share : (rank + 1) * share], micro)
    train_step(
        engine,
        batches,
        torch.device("cpu"),
        NonFiniteGuard(3),
        lambda: False,
        grad_accum,
        stage == 0,
        rank,
        world,
        model.max_predictions,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with _process_group(rank, world, port):
        params = _one_step(rank, world, micro=4, grad_accum=2, stage=2)
    if rank == 0:
        torch.save(params, out)


def test_a_step_is_the_mean_over_all_its_masked_tokens_whatever_the_split(tmp_path):
    with _process_group():
        big = _one_step(0, 1, micro=16, grad_accum=1, stage=0)
        accumulated = _one_step(0, 1, micro=4, grad_accum=4, stage=2)
    out = tmp_path / "two_ranks.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), str(out)), nprocs=2, join=True)
    two_ranks = torch.load(out, weights_only=True)
    before = _model().state_dict()
    assert not torch.equal(big["transform.weight"], before["transform.weight"])
    for name, reference in big.items():
        for other in (accumulated, two_ranks):
            assert (other[name] - reference).abs().max().item() <= 1e-6, name


class _CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", [0, 2])
def test_host_reads_per_step_do_not_grow_with_micro_batches(stage):
    def reads(grad_accum: int, steps: int = 2) -> int:
        model = _model()
        engine = _engine(model, micro=2, grad_accum=grad_accum, world=1, stage=stage)
        rows = _sequences() * 2
        batches = _micro_batches(rows, 2)
        guard = NonFiniteGuard(3)
        train_step(
            engine,
            batches,
            torch.device("cpu"),
            guard,
            lambda: False,
            grad_accum,
            stage == 0,
            0,
            1,
            model.max_predictions,
        )  # warm-up: DeepSpeed's first step sets itself up
        with _CountHostReads() as counter:
            for _ in range(steps):
                train_step(
                    engine,
                    batches,
                    torch.device("cpu"),
                    guard,
                    lambda: False,
                    grad_accum,
                    stage == 0,
                    0,
                    1,
                    model.max_predictions,
                    want_norm=False,
                )
        return counter.reads

    with _process_group():
        one, four = reads(1), reads(4)
    # Per optimizer step: ours (one) plus the optimizer's own on CPU (torch's AdamW reads its step count per
    # parameter there); none per micro-batch.
    assert four == one, (one, four)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_step_is_dropped_whole_and_redone(stage, capsys):
    with _process_group():
        model = _model()
        engine = _engine(model, micro=2, grad_accum=2, world=1, stage=stage)
        rows = _sequences()
        # A NaN in row 4 of the embedding, which the MLM head shares: every loss of the first attempt is
        # NaN (the first micro-batch's NaN gradients are accumulated before the step is read). Row 4 is
        # restored when the redo fetches its micro-batches.
        embedding = model.encoder.embeddings.token.weight
        saved = embedding.data[4].clone()
        embedding.data[4] = float("nan")
        stream = _micro_batches(rows, 2)

        def restore_after_first_attempt():
            yield next(stream)
            yield next(stream)
            embedding.data[4] = saved
            yield from stream

        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_step(
            engine,
            restore_after_first_attempt(),
            torch.device("cpu"),
            NonFiniteGuard(limit=3),
            lambda: False,
            2,
            stage == 0,
            0,
            1,
            model.max_predictions,
        )
        assert result.dropped == 2 and "non-finite loss on some rank" in capsys.readouterr().err
        assert engine.global_steps == 1 and engine.micro_steps == 2 and engine.skipped_steps == 0
        assert torch.isfinite(torch.as_tensor(result.grad_norm)).all()
        for name, value in model.state_dict().items():
            assert torch.isfinite(value).all(), name
        assert not torch.equal(before["transform.weight"], model.state_dict()["transform.weight"])
        embedding.data[:] = float("nan")
        with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
            train_step(
                engine,
                _micro_batches(rows * 4, 2),
                torch.device("cpu"),
                NonFiniteGuard(limit=3),
                lambda: False,
                2,
                stage == 0,
                0,
                1,
                model.max_predictions,
            )
