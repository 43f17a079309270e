"""`python -m slurm` and the cluster options; no cluster needed (submitit renders the script)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slurm.__main__ import main
from slurm.jobs import STAGES, Stage
from slurm.options import ClusterOptions, OptionsError, executor_kwargs, load_json, merge


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm", *args], capture_output=True, text=True, timeout=60)


def test_dry_run_renders_a_multi_node_pretrain_script(tmp_path):
    config = tmp_path / "cluster.json"
    config.write_text('{"partition": "gpu", "account": "proj42", "time_min": 1440, "gpus_per_node": 4}')
    proc = run_cli("pretrain", "--config", str(config), "--nodes", "2", "--cpus-per-task", "8",
                   "--mem-gb", "200", "--constraint", "a100", "--exclusive", "--sbatch-arg", "mail-type=END",
                   "--srun-arg=--cpu-bind=none", "--signal-lead-s", "300", "--setup", "module load cuda",
                   "--job-folder", str(tmp_path / "%j"), "--dry-run", "--", "--config", "base")
    lines = proc.stdout.splitlines()
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --time=1440",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=200GB", "#SBATCH --constraint=a100",
                 "#SBATCH --exclusive", "#SBATCH --mail-type=END", "#SBATCH --signal=USR2@300",
                 "#SBATCH --job-name=pretrain", f"#SBATCH --output={tmp_path}/%j/%j_0_log.out",
                 "module load cuda"]:
        assert line in lines, f"missing {line!r} in:\n{proc.stdout}"
    srun = next(x for x in lines if x.startswith("srun "))
    assert "--cpu-bind=none" in srun and "-m submitit.core._submit" in srun
    assert "slurm_max_num_timeout=3" in proc.stdout
    # pretrain has no launcher yet: it says so and fails, even for a dry run
    assert proc.returncode == 3 and "launcher for stage 'pretrain' is not written yet" in proc.stderr
    assert not any(tmp_path.glob("*/*")), "a dry run must not write job files"


@pytest.mark.parametrize("stage", ["preprocess", "pretrain", "finetune"])
def test_stage_without_launcher_says_so_and_exits_non_zero(stage):
    proc = run_cli(stage, "--", "--whatever")
    assert proc.returncode == 3
    assert f"launcher for stage '{stage}' is not written yet" in proc.stderr
    assert "nothing was submitted" in proc.stderr and proc.stdout == ""


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
    assert "unknown cluster option 'gpu_per_node'" in proc.stderr and str(config) in proc.stderr


def test_bad_values_are_rejected():
    with pytest.raises(OptionsError, match="'nodes' must be int"):
        merge(ClusterOptions(), {"nodes": "2"}, "test")
    with pytest.raises(OptionsError, match="'time_min' must be >= 1"):
        merge(ClusterOptions(), {"time_min": 0}, "test")
    with pytest.raises(OptionsError, match="USR1 can be swallowed by NCCL"):
        merge(ClusterOptions(), {"signal": "USR1"}, "test")


def test_flags_override_config_and_collections_add_up(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"time_min": 30, "sbatch_args": {"mail-type": "END"}, "setup": ["A=1"]}))
    monkeypatch.setitem(STAGES, "demo", Stage("demo", "test stage", "-", build=lambda args, opts, dry_run: [print] * 5))
    rc = main(["demo", "--config", str(config), "--time-min", "45", "--sbatch-arg", "requeue",
               "--setup", "B=2", "--array-parallelism", "2", "--job-folder", str(tmp_path / "%j"), "--dry-run"])
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
