"""Releases in Hugging Face transformers: the Auto classes with trust_remote_code, AutoTokenizer, the
fill-mask pipeline and Trainer, offline on local folders, for every mixer; the release's code is the
library's; the README snippet runs as written; bad releases fail in one line."""

import ast
import importlib.util
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the `hf` extra (`make test` installs it)

from hypermixer import MIXERS, EncoderConfig, ForMaskedLM, ForSequenceClassification  # noqa: E402
from hypermixer.hf.release import (  # noqa: E402
    HF_CLASSES,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    release_code,
    stale_release_code,
    tokenizer_files,
)

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "demo" / "data" / "glue"
README = ROOT / "README.md"
MAX_LEN = 48
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tmp_path_factory):
    """Offline, with Hugging Face's cache of dynamic modules in a temporary folder (not ~/.cache)."""
    import huggingface_hub.constants
    import transformers.dynamic_module_utils as dynamic_modules

    cache = str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_MODULES_CACHE", cache)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(dynamic_modules, "HF_MODULES_CACHE", cache)
        patch.setattr(sys, "path", list(sys.path))  # transformers appends the cache to sys.path
        yield cache


@contextmanager
def hf_log():
    """What transformers logs (its loggers do not propagate to the root logger, so caplog misses them)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


def sst2(split: str, n: int) -> list[tuple[str, int]]:
    rows = (GLUE / "SST-2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1 : n + 1]
    return [(text, int(label)) for text, label in (row.split("\t") for row in rows)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A WordPiece tokenizer really trained (on the SST-2 sample), with the side files a data build writes."""
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer([t for t, _ in sst2("train", 4000)], vocab_size=1000, min_frequency=2), folder)
    return folder


def tiny(mixer: str, vocab_size: int, **overrides) -> EncoderConfig:
    return EncoderConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_seq_len=MAX_LEN,
        mixer=mixer,
        **overrides,
    )


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A masked-LM release (what pretrain.export writes) per mixer, tiny and freshly initialised."""
    vocab = len(json.loads((tokenizer_dir / TOKENIZER_FILE).read_text())["model"]["vocab"])
    root = tmp_path_factory.mktemp("releases")
    out = {}
    for i, mixer in enumerate(MIXERS):
        torch.manual_seed(i)
        model = ForMaskedLM(
            tiny(mixer, vocab, hypermixer_position="learned" if mixer == "hypermixer" else "sinusoidal")
        )
        out[mixer] = model.save_pretrained(
            root / f"release-{mixer}", extra_files=tokenizer_files(tokenizer_dir, MAX_LEN)
        )
    return out


def padded_batch(vocab_size: int):
    """Three rows of 12, 9 and 5 tokens padded to 12; the first is a sentence pair (segment 1 at the end)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 9, 5)):
        ids[row, length:] = 0
        mask[row, length:] = 0
    types = torch.zeros_like(ids)
    types[0, 7:] = 1
    return ids, mask, types


def auto(kind: str, folder: Path, **kwargs):
    return getattr(transformers, kind).from_pretrained(folder, trust_remote_code=True, **kwargs)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOL


# ---- one source of truth ----------------------------------------------------------------------------


def test_release_code_is_the_library_code(releases):
    code = release_code()
    assert {
        "configuration_hypermixer.py",
        "modeling_hypermixer.py",
        "hypermixer_encoder.py",
        "hypermixer_mixers_hypermixing.py",
        "hypermixer_heads.py",
    } <= set(code)
    for name, text in code.items():
        # Each file is its library module with only `from hypermixer.x.y import` -> `from .hypermixer_x_y import`.
        header, body = text.split("\n", 1)
        source = ROOT / re.fullmatch(r"# Generated from (\S+) by .*", header).group(1)
        expected = re.sub(
            r"^(\s*)from hypermixer((?:\.\w+)+) import",
            lambda m: f"{m.group(1)}from .{_release_module(m.group(2))} import",
            source.read_text(encoding="utf-8"),
            flags=re.MULTILINE,
        )
        assert body == expected, name
        for node in ast.walk(ast.parse(body)):  # nothing left that needs the hypermixer package installed
            assert not (
                isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hypermixer")
            )
            assert not (isinstance(node, ast.Import) and any(a.name.startswith("hypermixer") for a in node.names))
    for release in releases.values():
        assert stale_release_code(release) == []
    # Run from a release (a model loaded by transformers, then saved), the same code copies the release's files.
    spec = importlib.util.spec_from_file_location("a_release_copy", releases["fnet"] / "hypermixer_hf_release.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.release_code() == code
    # What transformers runs is that file.
    model = auto("AutoModelForMaskedLM", releases["fnet"])
    assert Path(sys.modules[type(model).__module__].__file__).read_text() == code["modeling_hypermixer.py"]


def _release_module(dotted: str) -> str:
    parts = dotted.strip(".").split(".")
    if parts[:1] == ["hf"] and parts[-1].startswith(("configuration_", "modeling_")):
        return parts[-1]
    return "hypermixer_" + "_".join(parts)


def test_the_core_package_writes_releases_without_transformers(tmp_path):
    code = (
        "import sys; from hypermixer import EncoderConfig, ForMaskedLM; "
        "ForMaskedLM(EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, "
        f"max_seq_len=8)).save_pretrained({str(tmp_path)!r}); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert stale_release_code(tmp_path) == []


# ---- the Auto classes against the library -----------------------------------------------------------


@pytest.mark.parametrize("mixer", MIXERS)
def test_auto_classes_give_the_library_logits(releases, tmp_path, mixer):
    release = releases[mixer]
    ours = ForMaskedLM.from_pretrained(release).eval()
    ids, mask, types = padded_batch(ours.config.vocab_size)
    labels = torch.full_like(ids, -100)
    labels[:, [1, 3]] = ids[:, [1, 3]]
    mlm = auto("AutoModelForMaskedLM", release)
    assert type(mlm).__name__ == "HyperMixerForMaskedLM" and not mlm.training
    assert set(mlm.state_dict()) == set(ours.state_dict())  # one model.safetensors for both worlds
    with torch.no_grad():
        out = mlm(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
        assert close(out.logits, ours(ids, mask, types).logits)
        assert abs(out.loss.item() - ours(ids, mask, types, labels=labels).loss.item()) <= TOL
        assert len(out.hidden_states) == 3 and close(out.hidden_states[-1], ours.encoder(ids, mask, types))
        assert out.hidden_states[0].shape == (3, 12, 32)
        # attention_mask and token_type_ids are used, not dropped
        assert not close(mlm(input_ids=ids, token_type_ids=types).logits, out.logits)
        assert not close(mlm(input_ids=ids, attention_mask=mask).logits, out.logits)
        if mixer != "fnet":  # padding-invariant mixers: the padded row is the row alone
            assert close(mlm(input_ids=ids[2:, :5]).logits[0], out.logits[2, :5])
        base = auto("AutoModel", release)
        assert type(base).__name__ == "HyperMixerModel"
        assert close(base(ids, mask, types).last_hidden_state, ours.encoder(ids, mask, types))
        assert close(base(ids, mask, types, return_dict=False)[0], ours.encoder(ids, mask, types))

    torch.manual_seed(0)
    ForSequenceClassification.from_pretrained(release, num_labels=3).save_pretrained(tmp_path / "clf")
    ours_clf = ForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    clf = auto("AutoModelForSequenceClassification", tmp_path / "clf")
    assert clf.config.num_labels == 3
    with torch.no_grad():
        y = torch.tensor([0, 2, 1])
        out = clf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=y, output_hidden_states=True)
        reference = ours_clf(ids, mask, types, labels=y)
        assert close(out.logits, reference.logits) and abs(out.loss.item() - reference.loss.item()) <= TOL
        assert clf.config.problem_type == "single_label_classification" and len(out.hidden_states) == 3


def test_regression_head_has_problem_type_and_mse(releases, tmp_path):
    release = releases["transformer"]
    ForSequenceClassification.from_pretrained(release, num_labels=1).save_pretrained(tmp_path / "stsb")
    assert json.loads((tmp_path / "stsb" / "config.json").read_text())["problem_type"] == "regression"
    ours = ForSequenceClassification.from_pretrained(tmp_path / "stsb").eval()
    hf = auto("AutoModelForSequenceClassification", tmp_path / "stsb")
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    ids, mask, _ = padded_batch(ours.config.vocab_size)
    scores = torch.tensor([0.5, 4.2, 2.0])
    with torch.no_grad():
        out, reference = hf(input_ids=ids, attention_mask=mask, labels=scores), ours(ids, mask, labels=scores)
    assert out.logits.shape == (3, 1) and close(out.logits, reference.logits)
    assert abs(out.loss.item() - torch.mean((out.logits[:, 0] - scores) ** 2).item()) <= TOL
    assert abs(out.loss.item() - reference.loss.item()) <= TOL
    # A regression head straight from an MLM release: num_labels=1 decides it, as in Hugging Face.
    fresh = auto("AutoModelForSequenceClassification", release, num_labels=1)
    fresh(input_ids=ids, attention_mask=mask, labels=scores)
    assert fresh.config.problem_type == "regression"


def test_classifier_from_an_mlm_release_takes_labels_from_the_call(releases):
    release = releases["hypermixer"]
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    with hf_log() as log:
        clf, info = auto(
            "AutoModelForSequenceClassification",
            release,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            output_loading_info=True,
        )
    assert clf.config.num_labels == 3 and clf.config.id2label == labels and clf.classifier.out_features == 3
    assert set(info["missing_keys"]) == {"pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"}
    assert set(info["unexpected_keys"]) == {
        "transform.weight",
        "transform.bias",
        "transform_norm.weight",
        "transform_norm.bias",
        "output_bias",
    }
    assert any("newly initialized" in line for line in log)  # Hugging Face's usual warning
    ours = ForMaskedLM.from_pretrained(release)
    assert all(torch.equal(clf.encoder.state_dict()[k], v) for k, v in ours.encoder.state_dict().items())
    # The new head is initialised as the library does it (normal, std 0.02; zero bias), not left empty.
    assert 0.01 < clf.classifier.weight.std().item() < 0.04 and torch.count_nonzero(clf.pooler.bias) == 0
    # num_labels from the call, too; the config round-trips through save_pretrained with the labels
    assert auto("AutoModelForSequenceClassification", release, num_labels=5).config.num_labels == 5


# ---- tokenizer, pipeline, Trainer -------------------------------------------------------------------


def test_fill_mask_pipeline_and_autotokenizer(releases):
    release = releases["hypermixer"]
    tokenizer = auto("AutoTokenizer", release)
    assert tokenizer.model_max_length == MAX_LEN
    assert [
        tokenizer.pad_token,
        tokenizer.unk_token,
        tokenizer.cls_token,
        tokenizer.sep_token,
        tokenizer.mask_token,
    ] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    fill = transformers.pipeline("fill-mask", model=str(release), trust_remote_code=True)
    predictions = fill("the film is [MASK] .")
    assert len(predictions) == 5 and all({"score", "token", "token_str", "sequence"} <= set(p) for p in predictions)
    ids = tokenizer("the film is [MASK] .", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = (
            ForMaskedLM.from_pretrained(release)
            .eval()(ids)
            .logits[0, ids[0].tolist().index(tokenizer.mask_token_id)]
            .softmax(-1)
        )
    top = probs.topk(5)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert all(abs(p["score"] - s) <= TOL for p, s in zip(predictions, top.values.tolist()))


def test_trainer_fine_tunes_sst2_and_its_output_loads_in_both_worlds(releases, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    release = releases["hypermixer"]
    tokenizer = auto("AutoTokenizer", release)
    train = [dict(tokenizer(text, truncation=True), labels=label) for text, label in sst2("train", 64)]
    labels = {0: "negative", 1: "positive"}
    model = auto(
        "AutoModelForSequenceClassification",
        release,
        num_labels=2,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    head = model.classifier.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    assert not torch.equal(head, model.classifier.weight.detach())
    out = tmp_path / "sst2-model"
    trainer.save_model(str(out))

    dev = tokenizer([text for text, _ in sst2("dev", 4)], padding=True, truncation=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**dev).logits
        hf = auto("AutoModelForSequenceClassification", out)
        assert close(hf(**dev).logits, expected) and hf.config.id2label == labels
        ours = ForSequenceClassification.from_pretrained(out).eval()
        assert ours.num_labels == 2 and close(ours(dev["input_ids"], dev["attention_mask"]).logits, expected)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "ForSequenceClassification" and config["head"] == {"num_labels": 2}
    assert config["architectures"] == [HF_CLASSES["ForSequenceClassification"]]
    assert stale_release_code(out) == []  # its code is still the library's
    assert auto("AutoTokenizer", out).mask_token == "[MASK]"


def test_a_finetuned_model_folder_is_a_release(releases, tmp_path):
    from finetune.config import FinetuneConfig
    from finetune.trainer import train

    config = FinetuneConfig(
        release=str(releases["mlpmixer"]),
        task="SST-2",
        output_dir=str(tmp_path / "run"),
        glue_dir=str(GLUE),
        epochs=1,
        batch_size=16,
        max_train_examples=32,
        learning_rate=1e-3,
        device="cpu",
        eval_batch_size=512,
        predict_test=False,
    )
    train(config, progress=False)
    model_dir = tmp_path / "run" / "model"
    assert stale_release_code(model_dir) == []
    tokenizer = auto("AutoTokenizer", model_dir)
    assert tokenizer.model_max_length == MAX_LEN and tokenizer.mask_token == "[MASK]"
    batch = tokenizer(["a gripping , funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hf = auto("AutoModelForSequenceClassification", model_dir)(**batch).logits
        ours = (
            ForSequenceClassification.from_pretrained(model_dir)
            .eval()(batch["input_ids"], batch["attention_mask"])
            .logits
        )
    assert close(hf, ours)


# ---- the README and bad input -----------------------------------------------------------------------


def readme_snippet() -> str:
    section = README.read_text(encoding="utf-8").split("\n## Use a release in Hugging Face transformers\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL).group(1)


def test_readme_snippet_runs_verbatim(releases, tmp_path, monkeypatch, capsys):
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) == 5
    shutil.copytree(releases["hypermixer"], tmp_path / "runs" / "demo" / "release-hypermixer")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})
    top5, difference = capsys.readouterr().out.strip().splitlines()[-2:]
    assert len(ast.literal_eval(top5)) == 5
    assert float(difference) <= TOL


def test_bad_releases_fail_in_one_line(releases, tokenizer_dir, tmp_path, caplog):
    newer = shutil.copytree(releases["mlpmixer"], tmp_path / "newer")
    raw = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**raw, "format_version": 2}))
    for load in (
        lambda: transformers.AutoConfig.from_pretrained(newer, trust_remote_code=True),
        lambda: ForMaskedLM.from_pretrained(newer),
    ):
        with pytest.raises(ValueError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and "format_version 2" in message and "reads format_version 1" in message

    # No trust_remote_code: Hugging Face's own message, which names the flag.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.AutoModelForMaskedLM.from_pretrained(releases["mlpmixer"])

    # No tokenizer files: one line naming the missing file, from our writers and at model load.
    bare = shutil.copytree(releases["mlpmixer"], tmp_path / "bare")
    (bare / TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError) as err:
        tokenizer_files(bare, MAX_LEN)
    assert "\n" not in str(err.value) and str(bare / TOKENIZER_FILE) in str(err.value)
    with caplog.at_level(logging.WARNING):
        auto("AutoModelForMaskedLM", bare)
    assert [r.getMessage() for r in caplog.records if TOKENIZER_FILE in r.getMessage()] == [
        f"{bare}: no {TOKENIZER_FILE}, so AutoTokenizer and pipeline() cannot read a tokenizer from this folder"
    ]
    (tokenizer_dir / "custom").mkdir()
    (tokenizer_dir / "custom" / TOKENIZER_FILE).write_text(json.dumps({"added_tokens": [], "model": {}}))
    with pytest.raises(
        ValueError, match=f"{TOKENIZER_CONFIG_FILE}: no pad_token, unk_token, cls_token, sep_token, mask_token"
    ):
        tokenizer_files(tokenizer_dir / "custom", MAX_LEN)
