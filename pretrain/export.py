"""Release a checkpoint: `python -m pretrain.export <checkpoint> <out> [--check]`.

<checkpoint> is a step folder, a checkpoint dir (its latest complete checkpoint) or a run dir. Any ZeRO
stage: stages 1-3 are consolidated with DeepSpeed's zero_to_fp32 (fp32 master weights), stage 0 reads
the engine's module weights. The release folder holds what the model library's `from_pretrained`
reads (`config.json`, `model.safetensors`) plus `tokenizer.json` (checked against the manifest's
hash), `README.md` (a model card) and `training.json` (config, data hashes, steps, tokens, final metrics).
It is also a Hugging Face release: config.json carries `model_type`/`auto_map`, the model code is
generated from `hypermixer/` into the folder, and `tokenizer_config.json` holds the special tokens and
`model_max_length` for `AutoTokenizer` (see hypermixer.hf).

`--check` re-evaluates the release on the run's validation data, with the same sequences and masks,
and compares with the validation loss the training engine logged at that step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hypermixer import EncoderConfig, ForMaskedLM
from hypermixer.hf.release import tokenizer_files
from pretrain import checkpoint as ckpt


def find_checkpoint(spec: str | Path) -> Path:
    path = Path(spec)
    if (path / "checkpoints").is_dir() and ckpt.step_of(path) is None:
        path = path / "checkpoints"  # a run dir
    return ckpt.resolve_checkpoint(path)


def consolidated_weights(path: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a checkpoint folder of any ZeRO stage."""
    with ckpt.weights_only_loads(path):  # zero_to_fp32 itself asks for weights_only=False
        if zero_stage == 0:
            states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
            weights = states["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {name: tensor.detach().float().contiguous() for name, tensor in weights.items()}


def model_card(state: dict[str, Any], num_parameters: int, checkpoint: Path) -> str:
    model, config, data = state["model"], state["config"], state["data"]
    seq_len = model["max_seq_len"]
    lines = [
        f"# {state.get('run_name') or checkpoint.parent.parent.name}: {model['mixer']} masked-LM encoder",
        "",
        "Pretrained with the hypermixer-pipeline `pretrain` package (masked-LM, DeepSpeed). Load it with the "
        "model library (torch + safetensors only):",
        "",
        "```python",
        "from hypermixer import ForMaskedLM, ForSequenceClassification",
        'mlm = ForMaskedLM.from_pretrained("<this folder>")',
        'clf = ForSequenceClassification.from_pretrained("<this folder>", num_labels=2)',
        "```",
        "",
        "or with Hugging Face transformers (the model code is in this folder, hence `trust_remote_code=True`):",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, pipeline",
        'fill = pipeline("fill-mask", model="<this folder>", trust_remote_code=True)',
        'clf = AutoModelForSequenceClassification.from_pretrained("<this folder>", num_labels=2, trust_remote_code=True)',
        "```",
        "",
        "## Architecture",
        f"- token mixer: **{model['mixer']}**; {num_parameters:,} parameters",
        f"- hidden size {model['hidden_size']}, {model['num_layers']} layers, {model['num_heads']} heads, "
        f"feature MLP {model['intermediate_size']}, max sequence length {seq_len}, vocabulary {model['vocab_size']}",
        "- full encoder config: `config.json`",
        "",
        "## Training",
        f"- steps: {state['step']:,} of {state['total_steps']:,}; tokens: {state['tokens']:,} "
        f"(sequences x sequence length, padding included)",
        f"- global batch {config['batch']['global_batch_size']} sequences; precision {config['precision']}; "
        f"ZeRO stage {state['zero_stage']} on {state['world_size']} rank(s)",
        f"- optimizer: AdamW, peak lr {config['optim']['lr']}, warmup {config['optim']['warmup_steps']} steps, "
        f"{config['optim']['decay']} decay, weight decay {config['optim']['weight_decay']}",
        f"- masking: {config['data']['mask_prob']:.0%} of non-special tokens "
        f"({config['data']['mask_token_prob']:.0%} [MASK] / {config['data']['random_token_prob']:.0%} random)",
        "",
        "## Data",
        f"- manifest sha256 `{data['manifest_sha256']}` (at training time: `{data['path']}`)",
        f"- tokenizer sha256 `{data['tokenizer'].get('sha256')}` (`tokenizer.json` in this folder)",
        f"- validation: split `{data['validation_split']}` of `{data['validation_path']}`",
        "",
        "## Final metrics",
    ]
    train, evaluation = state.get("last_train"), state.get("last_eval")
    if train:
        lines.append(
            f"- training (step {train['step']}): MLM loss {train['loss']:.4f}, accuracy {train['accuracy']:.4f}"
        )
    if evaluation:
        lines.append(
            f"- validation (step {evaluation['step']}, {evaluation['masked_tokens']:,} masked tokens): "
            f"MLM loss {evaluation['loss']:.4f}, accuracy {evaluation['accuracy']:.4f}"
        )
    if not train and not evaluation:
        lines.append("- none recorded")
    return "\n".join(lines) + "\n"


def export(checkpoint: str | Path, out: str | Path) -> Path:
    path = find_checkpoint(checkpoint)
    state = ckpt.read_state(path)
    model = ForMaskedLM(EncoderConfig.from_saved(state["model"]))
    model.load_state_dict(consolidated_weights(path, int(state["zero_stage"])), strict=True)

    data = state["data"]
    tokenizer_file = Path(data["path"]) / data["tokenizer"]["file"]
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file}: the run's tokenizer is gone (data moved?)")
    tokenizer_text = tokenizer_file.read_bytes()
    if hashlib.sha256(tokenizer_text).hexdigest() != data["tokenizer"].get("sha256"):
        raise ValueError(f"{tokenizer_file}: sha256 differs from the one the run was trained with")
    # tokenizer.json and the side files transformers' AutoTokenizer reads (special tokens, model_max_length)
    tokenizer = tokenizer_files(tokenizer_file, model.config.max_seq_len)
    training = {
        key: state[key]
        for key in (
            "step",
            "total_steps",
            "tokens",
            "world_size",
            "zero_stage",
            "config",
            "model",
            "data",
            "last_train",
            "last_eval",
            "nonfinite_dropped",
        )
    }
    training["exported_from"] = str(path.resolve())
    num_parameters = sum(p.numel() for p in model.parameters())
    out = Path(out)
    model.save_pretrained(
        out,
        extra_files={
            **tokenizer,
            "README.md": model_card(state, num_parameters, path),
            "training.json": json.dumps(training, indent=1) + "\n",
        },
    )
    return out


def check_release(release: str | Path) -> dict[str, Any]:
    """Re-evaluate a release on its run's validation data (same sequences, same masks, same split over
    ranks) and compare with the validation loss the training engine logged at the exported step.
    Tolerances: fp32 runs 1e-5 relative on the loss; bf16/fp16 runs 5e-3 relative on the loss and 1%
    on accuracy (the engine computed in 16 bits, the release computes in fp32)."""
    from data_pipeline.shards import read_manifest
    from pretrain.config import DataConfig
    from pretrain.data import Masking, validation_batches
    from pretrain.evaluation import masked_lm_sums

    release = Path(release)
    training = json.loads((release / "training.json").read_text())
    logged = training.get("last_eval")
    if not logged or logged["step"] != training["step"]:
        raise ValueError(f"{release}: no validation result logged at step {training['step']} to compare with")
    config = training["config"]
    manifest = read_manifest(training["data"]["validation_path"])
    masking = Masking.from_manifest(manifest, DataConfig(**config["data"]))
    model = ForMaskedLM.from_pretrained(release).eval()
    world = int(training["world_size"])
    sums = torch.zeros(3, dtype=torch.float64)
    micro = config["eval"]["micro_batch_size"] or config["batch"]["micro_batch_size"]
    for rank in range(world):
        sums += masked_lm_sums(
            model,
            validation_batches(
                manifest,
                training["data"]["validation_split"],
                masking,
                config["seed"],
                rank,
                world,
                micro,
                config["eval"]["max_samples"],
            ),
            torch.device("cpu"),
        )
    loss_sum, correct, masked = sums.tolist()
    result = {
        "loss": loss_sum / masked,
        "accuracy": correct / masked,
        "masked_tokens": int(masked),
        "logged_loss": logged["loss"],
        "logged_accuracy": logged["accuracy"],
    }
    sixteen_bit = config["precision"] != "fp32"
    rtol, accuracy_tol = (5e-3, 0.01) if sixteen_bit else (1e-5, 0.0)
    result["ok"] = (
        int(masked) == logged["masked_tokens"]
        and abs(result["loss"] - logged["loss"]) <= rtol * abs(logged["loss"])
        and abs(result["accuracy"] - logged["accuracy"]) <= accuracy_tol + 2.0 / masked
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step_* folder, a checkpoint dir (its latest) or a run dir")
    parser.add_argument("out", help="the release folder to write")
    parser.add_argument(
        "--check",
        action="store_true",
        help="re-evaluate the release on the validation data and compare with the training log",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"pretrain.export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if args.check:
        result = check_release(out)
        print(
            f"check: validation loss {result['loss']:.6f} (logged {result['logged_loss']:.6f}), accuracy "
            f"{result['accuracy']:.6f} (logged {result['logged_accuracy']:.6f}) on {result['masked_tokens']:,} "
            f"masked tokens: {'OK' if result['ok'] else 'MISMATCH'}"
        )
        return 0 if result["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
