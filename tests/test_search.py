"""Random search in `finetune sweep`: the typed space and its errors, seeded draws, planning (resume,
refusals), failed trials, the EVP results and the SLURM array plan. Tiny models on a GLUE folder made
here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_finetune import make_release, make_tokenizer, sentence

from finetune.__main__ import main
from finetune.errors import FinetuneError
from finetune.search import FAILED_FILE, PARAMETERS, draw_trial, load_space, plan_random, presets
from finetune.sweep import aggregate, load_plan, plan_sweep, run_one, run_sweep

SPACE = {
    "learning_rate": {"kind": "log_uniform", "low": 1e-4, "high": 3e-3},
    "batch_size": {"kind": "choice", "values": [4, 8]},
    "warmup_ratio": {"kind": "uniform", "low": 0.0, "high": 0.2},
    "dropout": {"kind": "uniform", "low": 0.0, "high": 0.1},
}


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value))
    return path


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    """SST-2 and RTE, 16 training and 8 dev rows each, in the GLUE layout."""
    root = tmp_path_factory.mktemp("glue")
    for task, head, row in (
        ("SST-2", "sentence\tlabel", lambda i: f"{sentence(i)}\t{i % 2}"),
        (
            "RTE",
            "index\tsentence1\tsentence2\tlabel",
            lambda i: f"{i}\t{sentence(i)}\t{sentence(i + 1)}\t" + ("entailment" if i % 2 else "not_entailment"),
        ),
    ):
        (root / task).mkdir()
        for split, n in (("train", 16), ("dev", 8)):
            (root / task / f"{split}.tsv").write_text("\n".join([head] + [row(i) for i in range(n)]) + "\n")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    tokenizer = make_tokenizer([sentence(i) for i in range(40)])
    return make_release(tmp_path_factory.mktemp("release") / "hm", "hypermixer", tokenizer)


SETTINGS = dict(epochs=1, device="cpu", eval_batch_size=8, save_model=False, predict_test=False)


def test_shipped_spaces_load_and_search_every_parameter():
    assert {"small", "base"} <= set(presets())
    for name in ("small", "base"):
        assert set(load_space(name).searched()) == set(PARAMETERS)


def test_a_malformed_space_gives_one_line_per_mistake_naming_the_key(tmp_path):
    bad = write_json(
        tmp_path / "space.json",
        {
            "learning_rate": {"kind": "log_uniform", "low": -1, "high": 1e-3},
            "batch_size": {"kind": "uniform", "low": 1, "high": 3},
            "epochs": {"kind": "choice", "values": [2.5]},
            "warmup_ratio": {"kind": "uniform", "low": 0.5, "high": 0.1},
            "dropout": {"kind": "choice", "values": [1.0]},
            "weight_decay": {"kind": "gaussian"},
            "lr": 3,
        },
    )
    with pytest.raises(FinetuneError) as caught:
        load_space(bad)
    lines = str(caught.value).splitlines()
    assert all(line.startswith(f"{bad}: ") for line in lines)
    keys = sorted(line.removeprefix(f"{bad}: ").split(":")[0] for line in lines)
    assert keys == sorted(
        [
            "lr",
            "weight_decay.kind",
            "learning_rate.low",
            "batch_size.kind",
            "epochs.values",
            "warmup_ratio",
            "dropout.values",
        ]
    )
    assert f"{bad}: learning_rate.low: must be > 0, got -1.0" in lines
    assert f"{bad}: dropout.values: must be < 1, got 1.0" in lines
    with pytest.raises(FinetuneError, match="no such file, nor a shipped preset"):
        load_space(tmp_path / "missing.json")
    with pytest.raises(FinetuneError, match="learning_rate.kind: required"):
        load_space(write_json(tmp_path / "nokind.json", {"learning_rate": {"low": 1e-4, "high": 1e-3}}))


def test_draws_are_seeded_within_bounds_and_independent_of_the_trial_count():
    space = load_space("small")
    first = [draw_trial(space, 0, t) for t in range(30)]
    assert first == [draw_trial(space, 0, t) for t in range(30)]  # same command, same trials
    assert first != [draw_trial(space, 1, t) for t in range(30)]
    assert len({json.dumps(d, sort_keys=True) for d in first}) == 30
    for drawn in first:
        assert 1e-4 <= drawn["learning_rate"] <= 5e-3 and drawn["batch_size"] in (16, 32, 64)
        assert 0 <= drawn["dropout"] <= 0.2 and isinstance(drawn["seed"], int)
    rates = sorted(d["learning_rate"] for d in first)
    assert rates[0] < 5e-4 and rates[-1] > 1e-3  # log-uniform: both decades are visited


def test_plan_resume_and_refusals(release, glue, tmp_path):
    sweep = tmp_path / "sweep"
    space = write_json(tmp_path / "space.json", SPACE)
    specs = plan_random(
        sweep, [f"hm={release}"], "RTE,SST-2", space, 3, 7, ["pretrained", "scratch"], glue_dir=str(glue), **SETTINGS
    )
    assert len(specs) == 12 and specs[0].name == "hm--SST-2--trial000" and specs[0].trial == 0
    by_trial = {}
    for spec in specs:  # every model and task gets the same trial
        drawn = {k: spec.config[k] for k in ("learning_rate", "batch_size", "seed", "dropout")}
        assert by_trial.setdefault(spec.trial, drawn) == drawn
    assert [s.to_dict() for s in load_plan(sweep)] == [s.to_dict() for s in specs]
    again = plan_random(
        sweep, [f"hm={release}"], "RTE,SST-2", space, 5, 7, ["pretrained", "scratch"], glue_dir=str(glue), **SETTINGS
    )  # more trials: the first three unchanged
    assert [s.to_dict() for s in again if s.trial < 3] == [s.to_dict() for s in specs]
    assert len(load_plan(sweep)) == 20

    other = write_json(tmp_path / "other.json", {**SPACE, "learning_rate": {**SPACE["learning_rate"], "high": 1e-2}})
    with pytest.raises(FinetuneError, match=r"another search \(learning_rate.high: 0.003 in the sweep, 0.01 now\)"):
        plan_random(sweep, [f"hm={release}"], "RTE", other, 3, 7, glue_dir=str(glue), **SETTINGS)
    with pytest.raises(FinetuneError, match=r"search_seed: 7 in the sweep, 8 now"):
        plan_random(sweep, [f"hm={release}"], "RTE", space, 3, 8, glue_dir=str(glue), **SETTINGS)
    with pytest.raises(FinetuneError, match="holds a random search"):
        plan_sweep(sweep, [f"hm={release}"], "RTE", [1e-3], [0], [4], glue_dir=str(glue), **SETTINGS)
    grid = tmp_path / "grid"
    plan_sweep(grid, [f"hm={release}"], "RTE", [1e-3], [0], [4], glue_dir=str(glue), **SETTINGS)
    with pytest.raises(FinetuneError, match="holds a grid sweep"):
        plan_random(grid, [f"hm={release}"], "RTE", space, 3, glue_dir=str(glue), **SETTINGS)
    with pytest.raises(FinetuneError, match="batch_size: set by the random search"):
        plan_random(tmp_path / "x", [f"hm={release}"], "RTE", space, 3, glue_dir=str(glue), batch_size=4)


def test_failed_trials_are_recorded_never_stop_the_sweep_and_count_in_evp(release, glue, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    # learning rates of 1e30: the loss is NaN within the first epoch, whatever the seed
    diverging = write_json(
        tmp_path / "diverge.json", {"learning_rate": {"kind": "log_uniform", "low": 1e29, "high": 1e30}}
    )
    ok = write_json(tmp_path / "ok.json", SPACE)
    broken = tmp_path / "broken"  # pretrained weights that vanish after planning: every trial crashes
    shutil.copytree(release, broken)
    plan_random(sweep, [f"hm={release}", f"gone={broken}"], "RTE", ok, 3, 0, glue_dir=str(glue), **SETTINGS)
    (broken / "model.safetensors").unlink()
    summary = run_sweep(sweep, progress=False)
    assert summary["runs_done"] == 3 and summary["missing_runs"] == []
    assert set(summary["failed_runs"]) == {f"gone--RTE--trial00{t}" for t in range(3)}
    assert all(v.startswith("crashed: FinetuneError") for v in summary["failed_runs"].values())
    evp = summary["evp"]["models"]
    assert evp["hm"]["mixer"] == "hypermixer" and evp["hm"]["tasks"]["RTE"]["failed"] == 0
    assert evp["gone"]["tasks"]["RTE"]["failed"] == 3 and evp["gone"]["tasks"]["RTE"]["curve"] == []
    hm = evp["hm"]["tasks"]["RTE"]
    means = [p["mean"] for p in hm["curve"]]
    assert len(means) == 3 and all(b >= a - 1e-12 for a, b in zip(means, means[1:], strict=False))
    assert set(hm["table"]) == {"1", "5", "3"}
    table = (sweep / "results.md").read_text()
    assert (
        "## Expected validation performance (random search)" in table
        and "| hm | hypermixer | pretrained | RTE | 3 | 0 |" in table
    )
    assert (sweep / "evp-RTE.png").read_bytes()[:4] == b"\x89PNG"

    # rerun: finished trials skipped; a crashed trial is tried again once its cause is gone
    shutil.copy(release / "model.safetensors", broken / "model.safetensors")
    capsys.readouterr()
    summary = run_sweep(sweep, progress=False)
    assert summary["runs_done"] == 6 and summary["failed_runs"] == {}
    assert capsys.readouterr().out.count("already done") == 3

    # a diverged trial: recorded, and skipped on a rerun (it would diverge again)
    bad = tmp_path / "bad"
    spec = plan_random(bad, [f"hm={release}"], "SST-2", diverging, 1, 0, glue_dir=str(glue), batch_size=4, **SETTINGS)[
        0
    ]
    result = run_one(spec)
    assert result["kind"] == "diverged" and result["score"] != result["score"]  # NaN
    record = json.loads((spec.output_dir / FAILED_FILE).read_text())
    assert record["kind"] == "diverged" and "training loss is nan" in record["reason"]
    stamp = (spec.output_dir / FAILED_FILE).stat().st_mtime_ns
    assert run_one(spec.to_dict())["kind"] == "diverged"
    assert (spec.output_dir / FAILED_FILE).stat().st_mtime_ns == stamp
    summary = aggregate(bad)
    assert summary["runs_done"] == 0 and list(summary["failed_runs"]) == [spec.name]


def test_cli_random_search_and_its_errors(release, glue, tmp_path, capsys):
    space = write_json(tmp_path / "space.json", SPACE)
    base = [
        "sweep",
        "--sweep-dir",
        str(tmp_path / "s"),
        "--release",
        f"hm={release}",
        "--tasks",
        "SST-2",
        "--glue-dir",
        str(glue),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-save-model",
        "--no-predict",
        "--eval-batch-size",
        "8",
    ]
    assert main([*base, "--search", "random"]) == 2
    assert "--search random needs --space" in capsys.readouterr().err
    assert main([*base, "--search", "random", "--space", str(space), "--trials", "2", "--search-seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "planned 2 runs" in printed and "| hm | hypermixer | pretrained | SST-2 | 2 | 0 |" in printed
    assert json.loads((tmp_path / "s" / "search.json").read_text())["search_seed"] == 3
    assert main([*base, "--search", "random", "--space", "small", "--trials", "2", "--search-seed", "3"]) == 2
    assert "epochs: set by the random search" in capsys.readouterr().err  # the small space searches epochs
    other = write_json(tmp_path / "other.json", {k: v for k, v in SPACE.items() if k != "dropout"})
    assert main([*base, "--search", "random", "--space", str(other), "--trials", "2", "--search-seed", "3"]) == 2
    assert "planned from another search (dropout: {" in capsys.readouterr().err


def test_slurm_array_plans_the_random_search(release, glue, tmp_path, capsys):
    from slurm.__main__ import main as slurm_main

    sweep = tmp_path / "sweep"
    args = [
        "finetune",
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
        "--glue-dir",
        str(glue),
        "--search",
        "random",
        "--space",
        "small",
        "--trials",
        "4",
    ]
    assert slurm_main(args) == 0
    printed, err = capsys.readouterr()
    assert f"8 runs planned in {sweep / 'plan.json'}" in err and "#SBATCH --array=0-7" in printed
    assert not sweep.exists(), "a dry run plans nothing into the sweep folder"
    plan_random(sweep, [str(release)], "SST-2", "base", 4, glue_dir=str(glue))
    assert slurm_main(args) == 2
    assert "planned from another search" in capsys.readouterr().err


def test_dropout_setting_reaches_every_dropout_layer_and_the_saved_config(release):
    import torch

    from finetune.model import load

    default = load(release, 2, device="cpu")
    assert {m.p for m in default.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # the release's
    tuned = load(release, 2, device="cpu", dropout=0.03)
    assert {m.p for m in tuned.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.03}
    assert tuned.model.config.dropout == 0.03
