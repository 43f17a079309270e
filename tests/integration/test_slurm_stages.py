"""The three stage launchers (`python -m slurm preprocess|pretrain|finetune`) on the real local SLURM
cluster, through real submitit, running the real stage code (nothing mocked).

Time: the two pretraining jobs (the slow part: torch + DeepSpeed start-up, a requeue) are submitted by
a module fixture before the first test, so they run while the preprocessing and fine-tuning jobs do.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from slurm import submit as sub
from slurm.__main__ import main
from slurm.jobs import STAGES
from slurm.options import ClusterOptions

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 240  # bound on every wait; a first run on a fresh machine compiles DeepSpeed's shm op (~1 min)
STEPS = 48  # ~0.1 s per step here: enough left after the first logged step for the signal to land mid-run


def corpus(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    nouns = "cat dog bird fish horse cow sheep mouse lion tiger bear wolf".split()
    verbs = "sees chases likes follows finds watches".split()
    return (
        "\n".join(
            " ".join(["the", rng.choice(nouns), rng.choice(verbs), "the", rng.choice(nouns), "."] * rng.randint(1, 3))
            for _ in range(lines)
        )
        + "\n"
    )


# Small enough for seconds, big enough for 4 work units, duplicates (global dedup) and a validation split.
BUILD_ARGS = [
    "--vocab-size",
    "80",
    "--seq-len",
    "32",
    "--shard-mb",
    "0.004",
    "--unit-mb",
    "0.006",
    "--validation-fraction",
    "0.15",
    "--dedup",
    "global",
    "--no-progress",
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus(400))
    return path


@pytest.fixture(scope="module")
def shards(corpus_file) -> Path:
    """A local build (data_pipeline's own `build`): the pretraining data."""
    from data_pipeline.__main__ import main as data_pipeline_main

    out = corpus_file.parent / "local_build"
    assert data_pipeline_main(["build", str(corpus_file), "--out", str(out), *BUILD_ARGS]) == 0
    return out


def options(folder: Path, **kw) -> ClusterOptions:
    return ClusterOptions(job_folder=str(folder / "%j"), time_min=15, **kw)  # >= 15: a signal is a preemption


# ---- pretraining: submitted first, checked last ---------------------------------------------------------


def pretrain_args(data: Path, run_dir: Path) -> list[str]:
    return [
        "--config",
        "tiny",
        "--set",
        f"data.path={data}",
        f"output_dir={run_dir}",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.intermediate_size=64",
        "model.dropout=0.1",  # dropout on: the resume must restore the RNG too
        f"optim.total_steps={STEPS}",
        "optim.warmup_steps=2",
        "optim.lr=3e-3",
        "batch.global_batch_size=16",
        "batch.micro_batch_size=4",  # 2 ranks x 4 x 2 accumulation steps
        "data.num_workers=0",
        "logging.every_steps=1",
        "eval.every_steps=24",
        "checkpoint.every_steps=16",
        "checkpoint.keep_last=2",
        "logging.wandb.mode=disabled",
        "deepspeed.zero_optimization.stage=2",
    ]


class Interrupter(threading.Thread):
    """Sends what SLURM sends before a time limit (USR2 to every task of the job) once the run has logged
    its first training step, and records when things happened."""

    def __init__(self, job, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.job, self.run_dir = job, run_dir
        self.times: dict[str, float] = {"submitted": time.time()}
        self.error: str | None = None
        self.signalled_after_step: int | None = None

    def run(self) -> None:
        from pretrain.metrics import read_metrics

        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            steps = [r["step"] for r in read_metrics(self.run_dir) if r["kind"] == "train"]
            if steps:
                self.times["first_step"] = time.time()
                self.signalled_after_step = max(steps)
                subprocess.run(["scancel", "--signal=USR2", self.job.job_id], check=True, timeout=10)
                self.times["signalled"] = time.time()
                return
            time.sleep(0.05)
        self.error = f"the job never logged a training step within {WAIT_S}s"


@pytest.fixture(scope="module", autouse=True)
def pretrain_runs(slurm_cluster, shards, tmp_path_factory):
    """Two 2-task ZeRO-2 jobs of the same config, submitted together: one runs through, the other is
    signalled after its first step, requeued and resumed."""
    root = tmp_path_factory.mktemp("pretrain")
    stage = STAGES["pretrain"]
    opts = options(root / "jobs", tasks_per_node=2)
    runs = {}
    with pytest.MonkeyPatch.context() as mp:  # sbatch hands the submitting environment to the job
        mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")))
        mp.setenv("WANDB_MODE", "disabled")
        for name in ("uninterrupted", "signalled"):
            run_dir = root / name
            submitted = time.time()
            submission = sub.submit_steps(opts, "pretrain", stage.steps(pretrain_args(shards, run_dir), opts))
            runs[name] = (submission, run_dir, submitted)
    interrupter = Interrupter(runs["signalled"][0].steps[0].jobs[0], runs["signalled"][1])
    interrupter.start()
    runs["interrupter"] = interrupter
    yield runs
    for name in ("uninterrupted", "signalled"):
        if not runs[name][0].steps[0].jobs[0].done():
            runs[name][0].cancel()


# ---- preprocessing ------------------------------------------------------------------------------------


def test_preprocess_array_gives_the_local_build_s_shards(corpus_file, tmp_path, capsys, slurm_report):
    from data_pipeline.build import build
    from data_pipeline.config import BuildConfig
    from data_pipeline.shards import read_manifest

    out = tmp_path / "slurm_build"
    began = time.monotonic()
    rc = main(
        [
            "preprocess",
            "--job-folder",
            str(tmp_path / "jobs" / "%j"),
            "--time-min",
            "15",
            "--array-parallelism",
            "2",
            "--wait",
            "--wait-timeout-s",
            str(WAIT_S),
            "--",
            str(corpus_file),
            "--out",
            str(out),
            *BUILD_ARGS,
        ]
    )
    seconds = time.monotonic() - began
    printed, err = capsys.readouterr()
    assert rc == 0, printed + err
    # every job with its logs, in order, then one line per finished step
    for step in (
        "plan: job",
        "hash: array job",
        "resolve: job",
        "units: array job",
        "merge: job",
        "cancel all: scancel",
    ):
        assert step in printed, printed
    assert "4 tasks (afterok resolve)" in printed and "_<i>_0_log.err" in printed
    assert "preprocess-merge" in printed and "finished: manifest" in printed

    # The same shards as a local run. The tokenizer was trained in the plan job; WordPiece training can
    # break ties differently between runs (docs/data_pipeline.md), so the local run reuses that tokenizer.
    local = build(
        BuildConfig(
            inputs=[str(corpus_file)],
            out_dir=str(tmp_path / "local"),
            vocab_size=80,
            seq_len=32,
            shard_mb=0.004,
            unit_mb=0.006,
            validation_fraction=0.15,
            dedup="global",
            tokenizer=str(out / "tokenizer.json"),
        ),
        workers=1,
        progress=False,
    )
    ours, theirs = read_manifest(out), read_manifest(local)
    assert ours["report"]["units"] == 4 and ours["report"]["dropped"]["duplicate"] > 0
    assert ours["splits"] == theirs["splits"] and ours["tokenizer"] == theirs["tokenizer"]
    for split in ("train", "validation"):
        for shard in ours["splits"][split]["shards"]:
            assert (out / shard["path"]).read_bytes() == (Path(local).parent / shard["path"]).read_bytes()
    n = sum(len(s["shards"]) for s in ours["splits"].values())
    slurm_report(
        f"preprocess (plan, hash array x4, resolve, units array x4 at most 2 at once, merge): "
        f"{seconds:.1f}s from submission to manifest; {n} shards byte-identical to the local build"
    )


def test_preprocess_failure_shows_the_failing_task_s_error(shards, tmp_path, capsys):
    good, bad = tmp_path / "a_good.jsonl", tmp_path / "b_bad.jsonl"
    good.write_text("".join(json.dumps({"text": f"the cat sees the dog {i} ."}) + "\n" for i in range(20)))
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')
    rc = main(
        [
            "preprocess",
            "--job-folder",
            str(tmp_path / "jobs" / "%j"),
            "--time-min",
            "15",
            "--wait",
            "--wait-timeout-s",
            str(WAIT_S),
            "--",
            str(tmp_path / "*.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--tokenizer",
            str(shards / "tokenizer.json"),
            "--seq-len",
            "16",
            "--no-progress",
        ]
    )
    printed, err = capsys.readouterr()
    assert rc == 1
    units_job = printed.split("units: array job ")[1].split(",")[0]
    assert f"preprocess units: 1 of 2 array tasks failed ({units_job}_1)" in err
    assert f"{units_job}_1_0_log.err" in err  # where the whole log is
    # the error itself first, then the task's stderr with the traceback
    headline = next(line for line in err.splitlines() if line.startswith(f"job {units_job}_1 failed"))
    assert f": data_pipeline.errors.DataPipelineError: {bad}:3: not valid JSON" in headline
    assert "RUNNING" not in headline  # SLURM's accounting may lag behind the task's own result
    assert "Traceback (most recent call last)" in err
    assert "preprocess merge (job" in err and "not run, because units failed" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---- fine-tuning --------------------------------------------------------------------------------------


def write_sst2(root: Path, n_train: int = 24, n_dev: int = 12) -> Path:
    """A tiny SST-2 in the GLUE layout (sentence<TAB>label), as in tests/test_finetune.py."""
    words = "the a good bad great awful movie film plot actor fun boring".split()

    def rows(n, offset):
        return [
            f"{' '.join(words[(i * 7 + k * 3 + offset) % len(words)] for k in range(5 + i % 4))}\t{i % 2}"
            for i in range(n)
        ]

    (root / "SST-2").mkdir(parents=True)
    for split, n, offset in (("train", n_train, 0), ("dev", n_dev, 5)):
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(["sentence\tlabel"] + rows(n, offset)) + "\n")
    return root


def make_release(folder: Path, texts: list[str]) -> Path:
    """What pretrain.export writes (config.json, model.safetensors, tokenizer.json), freshly initialised."""
    import torch

    from data_pipeline.tokenizer import train_tokenizer
    from hypermixer import EncoderConfig, ForMaskedLM

    tokenizer = train_tokenizer(texts, vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=tokenizer.get_vocab_size(),
        mixer="hypermixer",
        max_seq_len=32,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
    )
    ForMaskedLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_finetune_sweep_array_then_aggregation_table(tmp_path, capsys, slurm_report):
    glue = write_sst2(tmp_path / "glue")
    texts = [line.split("\t")[0] for line in (glue / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    release = make_release(tmp_path / "tiny", texts)
    sweep = tmp_path / "sweep"
    began = time.monotonic()
    rc = main(
        [
            "finetune",
            "--job-folder",
            str(tmp_path / "jobs" / "%j"),
            "--time-min",
            "15",
            "--array-parallelism",
            "2",
            "--wait",
            "--wait-timeout-s",
            str(WAIT_S),
            "--",
            "--sweep-dir",
            str(sweep),
            "--release",
            f"tiny={release}",
            "--tasks",
            "SST-2",
            "--lrs",
            "1e-3,3e-4",
            "--seeds",
            "0",
            "--batch-sizes",
            "4",
            "--glue-dir",
            str(glue),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--no-save-model",
            "--no-predict",
        ]
    )
    seconds = time.monotonic() - began
    printed, err = capsys.readouterr()
    assert rc == 0, printed + err
    names = ["tiny--SST-2--lr0.001--bs4--seed0", "tiny--SST-2--lr0.0003--bs4--seed0"]
    assert "runs: array job" in printed and "aggregate: job" in printed and "(afterany runs)" in printed
    assert all(name in printed for name in names)  # the runs step's summary: each run and its score
    for name in names:
        assert json.loads((sweep / "runs" / name / "result.json").read_text())["task"] == "SST-2"
    table = (sweep / "results.md").read_text()
    assert "2 of 2 planned runs done" in table and "| Model | SST-2 | GLUE |" in table and "| tiny |" in table
    results = json.loads((sweep / "results.json").read_text())
    assert results["runs_done"] == 2 and results["models"]["tiny"]["tasks"]["SST-2"]["runs"] == 2
    assert (sweep / "results.png").read_bytes()[:4] == b"\x89PNG"
    slurm_report(f"finetune sweep (2 runs as an array, then aggregation): {seconds:.1f}s from submission to table")

    # submitted again: both runs are done, so only the aggregation job goes out
    rc = main(
        [
            "finetune",
            "--job-folder",
            str(tmp_path / "jobs" / "%j"),
            "--time-min",
            "15",
            "--dry-run",
            "--",
            "--sweep-dir",
            str(sweep),
            "--release",
            f"tiny={release}",
            "--tasks",
            "SST-2",
            "--lrs",
            "1e-3,3e-4",
            "--seeds",
            "0",
            "--batch-sizes",
            "4",
            "--glue-dir",
            str(glue),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--no-save-model",
            "--no-predict",
        ]
    )
    printed, err = capsys.readouterr()
    assert rc == 0 and "2 already done" in err
    assert "#SBATCH --job-name=finetune" in printed and "--array" not in printed and "--dependency" not in printed


# ---- pretraining: the jobs the module fixture submitted first -------------------------------------------


def test_pretrain_two_tasks_finish_and_leave_a_checkpoint(pretrain_runs, slurm_report):
    from pretrain import checkpoint as ckpt

    submission, run_dir, submitted = pretrain_runs["uninterrupted"]
    outcomes = submission.wait(timeout_s=WAIT_S)["pretrain"][0]  # one job, one result per rank
    assert [o.status for o in outcomes] == ["completed", "completed"]
    assert all(o.step == STEPS for o in outcomes)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == ckpt.tag_for(STEPS) and ckpt.is_complete(latest)
    assert str(latest) == outcomes[0].checkpoint
    assert sorted(p.name for p in latest.glob("rng_rank*")) == [
        "rng_rank00000.safetensors",
        "rng_rank00001.safetensors",
    ]
    assert json.loads((run_dir / "run_status.json").read_text())["status"] == "completed"
    job = submission.steps[0].jobs[0]
    log = job.stdout()
    assert "slurm pretrain: attempt 1, 2 ranks" in log and "ZeRO-2" in log and "--resume auto" in log
    assert "Requeued" not in log
    finished = json.loads((run_dir / "run_status.json").read_text())["updated_at"]
    slurm_report(
        f"pretrain, 2 tasks x {STEPS} steps, uninterrupted: submission to completed run {finished - submitted:.1f}s "
        f"(first attempt of the signalled job alongside)"
    )


def test_signalled_pretrain_is_requeued_and_ends_like_the_uninterrupted_run(pretrain_runs, slurm_report):
    from pretrain import checkpoint as ckpt
    from pretrain.metrics import read_metrics

    interrupter = pretrain_runs["interrupter"]
    submission, run_dir, _ = pretrain_runs["signalled"]
    outcomes = submission.wait(timeout_s=WAIT_S)["pretrain"][0]
    interrupter.join(timeout=1)
    assert interrupter.error is None, interrupter.error
    assert [(o.status, o.step) for o in outcomes] == [("completed", STEPS)] * 2

    job = submission.steps[0].jobs[0]
    log = job.stdout()
    assert "slurm pretrain: attempt 1" in log and "slurm pretrain: attempt 2" in log, log[-3000:]
    assert "this job is preempted" in log and "Requeued job" in log  # submitit's requeue, on rank 0
    stopped = [line for line in log.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1, "the signal must land mid-run (the run finished first?)\n" + log[-3000:]
    stop_step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 0 < stop_step < STEPS
    assert f"resuming from {run_dir / 'checkpoints' / ckpt.tag_for(stop_step)} (step {stop_step})" in log
    assert "asking the stage to checkpoint and stop" in job.task(1).stderr()

    # The same steps and the same losses, bit for bit (fp32 on CPU, same world size), as the run never stopped.
    reference_dir = pretrain_runs["uninterrupted"][1]
    pretrain_runs["uninterrupted"][0].wait(timeout_s=WAIT_S)
    ours, reference = read_metrics(run_dir), read_metrics(reference_dir)

    def losses(records, kind):
        return [(r["step"], r["loss"], r["accuracy"]) for r in records if r["kind"] == kind]

    assert [s for s, _, _ in losses(ours, "train")] == list(range(1, STEPS + 1))
    assert losses(ours, "train") == losses(reference, "train")
    assert losses(ours, "eval") == losses(reference, "eval") and [s for s, _, _ in losses(ours, "eval")] == [24, 48]
    final = {
        k: ckpt.read_state(ckpt.latest_checkpoint(d / "checkpoints"))["last_train"]
        for k, d in (("requeued", run_dir), ("uninterrupted", reference_dir))
    }
    assert (final["requeued"]["step"], final["requeued"]["loss"]) == (
        final["uninterrupted"]["step"],
        final["uninterrupted"]["loss"],
    )
    t = interrupter.times
    requeued = submitit_time(log, "Requeued job")
    restarted = submitit_time(log, "Starting with JobEnvironment", nth=1)
    finished = json.loads((run_dir / "run_status.json").read_text())["updated_at"]
    slurm_report(
        f"pretrain requeue: first step logged {t['first_step'] - t['submitted']:.1f}s after submission; "
        f"USR2 after step {interrupter.signalled_after_step}, stopped with a checkpoint at step {stop_step}; "
        f"signal -> requeued {requeued - t['signalled']:.1f}s -> job running again {restarted - requeued:.1f}s "
        f"-> run completed {finished - restarted:.1f}s (signal to completion {finished - t['signalled']:.1f}s)"
    )
    slurm_report(
        f"pretrain final step/loss: requeued {final['requeued']['step']} {final['requeued']['loss']!r}, "
        f"uninterrupted {final['uninterrupted']['step']} {final['uninterrupted']['loss']!r}"
    )


def submitit_time(log: str, text: str, nth: int = 0) -> float:
    """The time stamp of the nth submitit log line holding `text`."""
    from datetime import datetime

    lines = [line for line in log.splitlines() if line.startswith("submitit ") and text in line]
    stamp = lines[nth].split("(", 1)[1].split(")", 1)[0]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
