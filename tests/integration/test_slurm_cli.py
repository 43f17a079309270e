"""`python -m slurm` and the cluster options; no cluster needed (submitit renders the script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm.__main__ import main
from slurm.jobs import STAGES, Stage
from slurm.options import ClusterOptions, OptionsError, executor_kwargs, load_json, merge


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> Path:
    """A real data_pipeline build to point pretraining configs at (the launcher resolves them)."""
    from data_pipeline.__main__ import main as data_pipeline_main

    root = tmp_path_factory.mktemp("data")
    # enough for a micro-batch of base's 32 sequences on each of 16 streams (8 ranks x 2 loader workers)
    (root / "corpus.txt").write_text("".join(f"the cat {i % 7} sees the dog {i % 5} .\n" for i in range(1500)))
    assert (
        data_pipeline_main(
            [
                "build",
                str(root / "corpus.txt"),
                "--out",
                str(root / "out"),
                "--vocab-size",
                "40",
                "--seq-len",
                "16",
                "--validation-fraction",
                "0.1",
                "--no-progress",
            ]
        )
        == 0
    )
    return root / "out"


def test_dry_run_renders_a_multi_node_pretrain_script(tmp_path, small_build):
    config = tmp_path / "cluster.json"
    config.write_text('{"partition": "gpu", "account": "proj42", "time_min": 1440, "gpus_per_node": 4}')
    proc = run_cli(
        "pretrain",
        "--config",
        str(config),
        "--nodes",
        "2",
        "--cpus-per-task",
        "8",
        "--mem-gb",
        "200",
        "--constraint",
        "a100",
        "--exclusive",
        "--sbatch-arg",
        "mail-type=END",
        "--srun-arg=--cpu-bind=none",
        "--setup",
        "module load cuda",
        "--job-folder",
        str(tmp_path / "%j"),
        "--dry-run",
        "--",
        "--config",
        "base",
        "--set",
        f"data.path={small_build}",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --time=1440",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=200GB",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        "#SBATCH --signal=USR2@300",  # the pretrain stage's default lead: a step + a checkpoint + margin
        "#SBATCH --job-name=pretrain",
        f"#SBATCH --output={tmp_path}/%j/%j_0_log.out",
        "module load cuda",
    ]:
        assert line in lines, f"missing {line!r} in:\n{proc.stdout}"
    srun = next(x for x in lines if x.startswith("srun "))
    assert "--cpu-bind=none" in srun and "-m submitit.core._submit" in srun
    assert "slurm_max_num_timeout=3" in proc.stdout
    # the config was resolved for the job's world size before anything would be submitted
    assert "8 ranks (2 nodes x 4 tasks)" in proc.stderr and "grad accumulation 1" in proc.stderr
    assert not any(tmp_path.glob("*/*")), "a dry run must not write job files"


def test_pretrain_mistakes_are_refused_before_submission(tmp_path, small_build, capsys):
    common = ["--job-folder", str(tmp_path / "%j"), "--dry-run", "--", "--config", "base"]
    # 256 sequences per step cannot be split over 3 ranks x 32: caught for the job's world size
    assert main(["pretrain", "--tasks-per-node", "3", *common, "--set", f"data.path={small_build}"]) == 2
    err = capsys.readouterr().err
    assert "global_batch_size (256) must be a multiple" in err and "checked for 3 ranks" in err
    assert "nothing was submitted" in err
    assert main(["pretrain", *common]) == 2
    assert "data.path: required" in capsys.readouterr().err
    assert main(["pretrain", *common, "--set", f"data.path={small_build}", "--resume", "none"]) == 2
    assert "every attempt runs with --resume auto" in capsys.readouterr().err
    assert main(["pretrain", *common[:-2]]) == 2
    assert "no pretrain arguments" in capsys.readouterr().err


def test_pretrain_job_always_resumes_automatically():
    from pretrain.trainer import RunOutcome
    from slurm.jobs import StageError
    from slurm.launchers.pretrain import PretrainJob, job_argv

    assert job_argv(["--config", "tiny"]) == ["--config", "tiny", "--resume", "auto"]
    assert job_argv(["--resume", "auto", "--config", "tiny", "--local_rank", "0"]) == [
        "--config",
        "tiny",
        "--resume",
        "auto",
    ]
    assert job_argv(["--resume=auto", "--local-rank=1", "--config", "x"]) == ["--config", "x", "--resume", "auto"]
    for bad in (["--resume", "runs/x/checkpoints/step_00001000"], ["--resume", "none"], ["--print-config"]):
        with pytest.raises(StageError):
            job_argv(["--config", "tiny", *bad])
    job = PretrainJob(["--config", "tiny", "--resume", "auto"], cpu=True)
    assert job.finished(RunOutcome("completed", 10, 10, "run"))
    assert not job.finished(RunOutcome("stopped", 4, 10, "run", signal="SIGTERM"))  # -> requeue


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"the cat {i % 7} sees the dog {i % 5} .\n" for i in range(400)))
    return path


def test_preprocess_dry_run_shows_plan_array_and_merge(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    common = [
        "--job-folder",
        str(tmp_path / "jobs" / "%j"),
        "--array-parallelism",
        "2",
        "--dry-run",
        "--",
        str(corpus),
        "--out",
        str(out),
        "--unit-mb",
        "0.003",
        "--no-progress",
    ]
    assert main(["preprocess", *common]) == 0
    printed, err = capsys.readouterr()
    lines = printed.splitlines()
    assert "python -m slurm preprocess: 4 units" in err
    assert [x for x in lines if x.startswith("# ==== step")] == [
        "# ==== step 1/3: plan (job) ====",
        "# ==== step 2/3: units (array job of 4 tasks, afterok plan) ====",
        "# ==== step 3/3: merge (job, afterok units) ====",
    ]
    for line in (
        "#SBATCH --job-name=preprocess-plan",
        "#SBATCH --job-name=preprocess-units",
        "#SBATCH --job-name=preprocess-merge",
        "#SBATCH --array=0-3%2",
        "#SBATCH --dependency=afterok:JOBID_OF_PREPROCESS_PLAN",
        "#SBATCH --dependency=afterok:JOBID_OF_PREPROCESS_UNITS",
        "#SBATCH --kill-on-invalid-dep=yes",
        f"#SBATCH --output={tmp_path}/jobs/%A_%a/%A_%a_0_log.out",
    ):
        assert line in lines, f"missing {line!r}"
    assert not out.exists() and not (tmp_path / "jobs").exists(), "a dry run writes nothing"

    assert main(["preprocess", *common, "--dedup", "global"]) == 0  # the hash pass and its resolution come first
    steps = [x for x in capsys.readouterr().out.splitlines() if x.startswith("# ==== step")]
    assert [x.split(": ")[1].split(" ")[0] for x in steps] == ["plan", "hash", "resolve", "units", "merge"]


def test_preprocess_mistakes_are_one_line_before_submission(tmp_path, corpus, capsys):
    assert main(["preprocess", "--dry-run", "--", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing.txt'}: no such file or directory" in err and "nothing was submitted" in err
    assert main(["preprocess", "--nodes", "2", "--dry-run", "--", str(corpus), "--out", str(tmp_path / "o")]) == 2
    assert "parallelism comes from the array" in capsys.readouterr().err
    assert main(["preprocess", "--dry-run", "--", str(corpus)]) == 2  # the stage's own parser: --out missing
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_stage_arguments_help_is_the_stage_s_own(capsys):
    assert main(["preprocess", "--", "--help"]) == 0
    assert "--seq-len" in capsys.readouterr().out
    assert main(["finetune", "--", "--help"]) == 0
    assert "--sweep-dir" in capsys.readouterr().out


def test_finetune_dry_run_plans_in_a_scratch_folder(tmp_path, capsys):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hypermixer import EncoderConfig, ForMaskedLM

    release = tmp_path / "release"
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    ForMaskedLM(
        EncoderConfig(
            vocab_size=len(vocab), hidden_size=16, num_layers=1, num_heads=1, intermediate_size=32, max_seq_len=16
        )
    ).save_pretrained(release)
    tokenizer.save(str(release / "tokenizer.json"))
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    sweep = tmp_path / "sweep"
    args = [
        "finetune",
        "--array-parallelism",
        "4",
        "--gpus-per-node",
        "1",
        "--job-folder",
        str(tmp_path / "%j"),
        "--dry-run",
        "--",
        "--sweep-dir",
        str(sweep),
        "--release",
        str(release),
        "--tasks",
        "SST-2,RTE",
        "--lrs",
        "1e-4,3e-4",
        "--seeds",
        "0,1",
        "--glue-dir",
        str(tmp_path / "glue"),
    ]
    assert main(args) == 0
    printed, err = capsys.readouterr()
    lines = printed.splitlines()
    assert f"8 runs planned in {sweep / 'plan.json'}" in err
    assert [x for x in lines if x.startswith("# ==== step")] == [
        "# ==== step 1/2: runs (array job of 8 tasks) ====",
        "# ==== step 2/2: aggregate (job, afterany runs) ====",
    ]
    for line in (
        "#SBATCH --array=0-7%4",
        "#SBATCH --job-name=finetune-runs",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --dependency=afterany:JOBID_OF_FINETUNE_RUNS",
        "#SBATCH --job-name=finetune-aggregate",
    ):
        assert line in lines, f"missing {line!r}"
    aggregate = printed.split("step 2/2")[1]
    assert "--gpus-per-node" not in aggregate and "--kill-on-invalid-dep" not in aggregate  # runs whatever happened
    assert not sweep.exists(), "a dry run plans nothing into the sweep folder"
    assert main([*args, "--epochs", "0"]) == 2
    assert "epochs: must be > 0, got 0" in capsys.readouterr().err


def test_stage_without_launcher_says_so_and_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setitem(STAGES, "later", Stage("later", "not written yet", "python -m later ..."))
    assert main(["later", "--", "--whatever"]) == 3
    printed, err = capsys.readouterr()
    assert "launcher for stage 'later' is not written yet" in err and "python -m later" in err
    assert "nothing was submitted" in err and printed == ""


@pytest.mark.parametrize("stage", ["preprocess", "pretrain", "finetune"])
def test_help_on_each_stage(stage):
    proc = run_cli(stage, "--help")
    assert proc.returncode == 0
    for flag in ("--partition", "--time-min", "--gpus-per-node", "--dry-run", "--config", "--signal-lead-s"):
        assert flag in proc.stdout


def test_unknown_config_key_is_a_one_line_error_naming_it(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"partition": "gpu", "gpu_per_node": 4}')
    proc = run_cli("pretrain", "--config", str(config), "--dry-run")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "gpu_per_node: unknown key; did you mean 'gpus_per_node'?" in proc.stderr and str(config) in proc.stderr


def test_bad_values_are_rejected():
    with pytest.raises(OptionsError, match='nodes: expected an integer, got "2" \\(test\\)'):
        merge(ClusterOptions(), {"nodes": "2"}, "test")
    with pytest.raises(OptionsError, match="time_min: must be >= 1, got 0"):
        merge(ClusterOptions(), {"time_min": 0}, "test")
    with pytest.raises(OptionsError, match="USR1 can be swallowed by NCCL"):
        merge(ClusterOptions(), {"signal": "USR1"}, "test")


def test_flags_override_config_and_collections_add_up(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"time_min": 30, "sbatch_args": {"mail-type": "END"}, "setup": ["A=1"]}))
    monkeypatch.setitem(STAGES, "demo", Stage("demo", "test stage", "-", build=lambda args, opts, dry_run: [print] * 5))
    rc = main(
        [
            "demo",
            "--config",
            str(config),
            "--time-min",
            "45",
            "--sbatch-arg",
            "requeue",
            "--setup",
            "B=2",
            "--array-parallelism",
            "2",
            "--job-folder",
            str(tmp_path / "%j"),
            "--dry-run",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert "#SBATCH --time=45" in lines and "#SBATCH --mail-type=END" in lines and "#SBATCH --requeue" in lines
    assert lines.index("A=1") < lines.index("B=2")
    assert "#SBATCH --array=0-4%2" in lines  # five callables: one array job
    assert "#SBATCH --ntasks-per-node=1" in lines  # CPU job: one task per node


def test_executor_kwargs_mapping():
    ctor, params = executor_kwargs(ClusterOptions(gpus_per_node=8, nodes=4, max_requeues=5, mem_gb=0.5), "pretrain")
    assert ctor == {"folder": "runs/slurm/%j", "slurm_max_num_timeout": 5}
    assert params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8 and params["nodes"] == 4
    assert params["name"] == "pretrain" and params["mem_gb"] == 0.5
    assert params["slurm_signal_delay_s"] == 120 and "slurm_additional_parameters" not in params
    # another signal: the #SBATCH line and the job's submitit must agree
    _, params = executor_kwargs(ClusterOptions(signal="SIGHUP", signal_lead_s=200), "x")
    assert params["slurm_additional_parameters"]["signal"] == "HUP@200"
    assert params["slurm_setup"][0] == "export SUBMITIT_PREEMPT_SIGNAL=HUP"


def test_load_json_layers_on_stage_defaults(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"partition": "gpu"}')
    opts = load_json(config, ClusterOptions(time_min=1440))
    assert opts.partition == "gpu" and opts.time_min == 1440
    config.write_text("[1, 2]")
    with pytest.raises(OptionsError, match="expected a JSON object"):
        load_json(config)
