"""bench.tuning --quick: the whole measurement's code path (four mixers, two tasks, random search,
EVP curves, report) on a small GLUE folder made here, then a rerun that continues instead of redoing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_finetune import sentence

from bench.report import generate
from bench.tuning import tables
from hypermixer import MIXERS

ROOT = Path(__file__).resolve().parents[1]


def write_tasks(root: Path) -> Path:
    """SST-2 and MRPC in the GLUE layout: 64 training and 24 dev rows each."""
    for task, head, row in (
        ("SST-2", "sentence\tlabel", lambda i: f"{sentence(i)}\t{i % 2}"),
        (
            "MRPC",
            "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            lambda i: f"{i % 2}\t{i}\t{i + 1}\t{sentence(i)}\t{sentence(i + 3)}",
        ),
    ):
        (root / task).mkdir(parents=True)
        for split, n in (("train", 64), ("dev", 24)):
            (root / task / f"{split}.tsv").write_text("\n".join([head] + [row(i) for i in range(n)]) + "\n")
    return root


def test_quick_run_writes_curves_table_and_resumes(tmp_path):
    glue = write_tasks(tmp_path / "glue")
    out = tmp_path / "tuning"
    command = [sys.executable, "-m", "bench.tuning", "--quick", "--out", str(out), "--glue-dir", str(glue)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "results.json").read_text())
    assert report["command"] == f"python -m bench.tuning --quick --out {out} --glue-dir {glue}"
    models = report["evp"]["models"]
    assert sorted(m["mixer"] for m in models.values()) == sorted(MIXERS)
    trials = report["setup"]["trials_per_model_and_task"]
    for model in models.values():
        assert set(model["tasks"]) == {"SST-2", "MRPC"}
        for task in model["tasks"].values():
            means = [p["mean"] for p in task["curve"]]
            assert len(means) == trials, task
            assert all(b >= a - 1e-12 for a, b in zip(means, means[1:], strict=False)), means  # EVP rises with k
            assert all(0.0 <= p["mean"] <= 1.0 and p["std"] >= 0.0 for p in task["curve"])
    # the same trials (hyperparameters and training seeds) for every mixer
    plan = json.loads((out / "sweep" / "plan.json").read_text())["runs"]
    drawn = {}
    for run in plan:
        values = {k: run["config"][k] for k in ("learning_rate", "batch_size", "seed", "dropout", "warmup_ratio")}
        assert drawn.setdefault((run["task"], run["trial"]), values) == values
    # half of each dev set is label 0, the training set's first most frequent: accuracy 0.5, and MRPC's F1 is 0
    assert report["majority_baseline"] == {"SST-2": 0.5, "MRPC": 0.25}
    table = (out / "results.md").read_text()
    assert "| Model | Mixer | Init | Task | N | Failed | k=1 | k=5 | k=N |" in table and "Against the paper" in table
    # bench.report's section for it: the same tables, and not the per-trial record beside them
    results = tmp_path / "results" / "tuning"
    results.mkdir(parents=True)
    for name in ("results.json", "trials.json"):
        shutil.copyfile(out / name, results / name)
    page = generate(results.parent)
    assert "\n".join(tables(report)) in page and "trials.json" not in page
    for task in ("SST-2", "MRPC"):
        assert (out / f"evp-{task}.png").read_bytes()[:4] == b"\x89PNG"

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done") == len(plan) == 4 * 2 * trials

    # a fresh clone holds the committed trials.json but no sweep folder: a rerun trains no trial again
    recorded = json.loads((out / "trials.json").read_text())
    assert sorted(recorded) == sorted(run["name"] for run in plan)
    shutil.rmtree(out / "sweep")
    shutil.rmtree(out / "releases")
    fresh = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.count("already done") == len(plan) and "starting" not in fresh.stdout
    assert json.loads((out / "results.json").read_text())["evp"] == report["evp"]
    # a recorded trial whose drawn values are not the plan's is refused, not mixed in
    shutil.rmtree(out / "sweep")
    name = next(iter(recorded))
    recorded[name]["settings"]["learning_rate"] *= 2
    (out / "trials.json").write_text(json.dumps(recorded))
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and f"trial {name} was recorded with" in refused.stderr


def test_pretrained_only_plans_the_given_releases_from_their_weights_alone(tmp_path):
    import pytest

    from bench.tuning import QUICK, make_models, parse_args, scratch_releases

    glue = write_tasks(tmp_path / "glue")
    made = scratch_releases(["hypermixer"], None, QUICK, glue, ["SST-2", "MRPC"], tmp_path / "made")
    given = [f"hm={made['hypermixer']}"]
    assert make_models(given, QUICK, glue, ["SST-2"], tmp_path / "a", pretrained_only=True) == [
        (given, ("pretrained",))
    ]
    assert not (tmp_path / "a").exists()  # no model from random weights is made
    default = make_models(given, QUICK, glue, ["SST-2"], tmp_path / "b")
    assert default[0] == (given, ("pretrained", "scratch"))
    assert sorted(r.split("=")[0] for r in default[1][0]) == sorted(m for m in MIXERS if m != "hypermixer")
    with pytest.raises(SystemExit):
        parse_args(["--pretrained-only"])


def test_a_trial_recorded_from_other_weights_is_refused(tmp_path):
    """Release folders are not kept by git: a trials.json continued with a release pretrained again (another
    model, under the same path) must not mix the old trials into the new release's curve."""
    import pytest
    import torch

    from bench.tuning import QUICK, BenchError, record_trial, restore_trials, scratch_releases
    from finetune.search import PARAMETERS
    from finetune.sweep import RunSpec
    from finetune.trainer import RESULT_FILE
    from hypermixer import ForMaskedLM, read_release_config

    glue = write_tasks(tmp_path / "glue")
    release = scratch_releases(["hypermixer"], None, QUICK, glue, ["SST-2", "MRPC"], tmp_path / "made")["hypermixer"]
    config = {key: 0.1 for key in PARAMETERS} | {"seed": 3, "max_train_examples": 64, "max_seq_len": 32}
    config |= {"release": str(release), "from_scratch": False, "output_dir": str(tmp_path / "sweep" / "run")}
    spec = RunSpec(name="hm--SST-2--trial000", model="hm", task="SST-2", config=config, trial=0)
    spec.output_dir.mkdir(parents=True)
    (spec.output_dir / RESULT_FILE).write_text(json.dumps({"score": 0.75}))
    trials = tmp_path / "trials.json"
    recorded: dict = {}
    assert record_trial(spec, recorded, trials)
    assert len(json.loads(trials.read_text())[spec.name]["settings"]["release_sha256"]) == 64

    # the same weights in a fresh sweep folder: put back, not trained again
    shutil.rmtree(tmp_path / "sweep")
    restore_trials([spec], trials)
    assert json.loads((spec.output_dir / RESULT_FILE).read_text()) == {"score": 0.75}

    # the release pretrained again (other weights, same folder): refused, naming why
    shutil.rmtree(tmp_path / "sweep")
    torch.manual_seed(1)
    ForMaskedLM(read_release_config(release)["encoder"]).save_pretrained(release)
    with pytest.raises(BenchError, match=r"trial hm--SST-2--trial000 started from other weights"):
        restore_trials([spec], trials)
    assert not (spec.output_dir / RESULT_FILE).exists()

    # a trial recorded before digests were kept cannot be told apart from another release's: refused too
    legacy = json.loads(trials.read_text())
    del legacy[spec.name]["settings"]["release_sha256"]
    trials.write_text(json.dumps(legacy))
    with pytest.raises(BenchError, match="without the digest of the release"):
        restore_trials([spec], trials)
