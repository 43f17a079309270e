"""A pretraining phase that starts from a release's weights: BERT's schedule of most steps at 128 tokens,
then the last ~10% at 512, as two runs.

    torchrun --standalone --nproc_per_node 2 pretrain/phases.py --init-from releases/phase1 \\
        --config cpu-long --set data.path=shards-512 output_dir=runs/phase2

Everything after `--init-from RELEASE` (and `--extend-positions`) is `pretrain/main.py`'s command line; the
run is an ordinary pretraining run (its own optimizer, warmup and schedule, checkpoints, `--resume auto`),
whose model starts from the release's weights (encoder and masked-LM head) instead of random ones. The
release must have this run's architecture (every encoder setting but `max_seq_len` and the dropouts) and
the tokenizer the data was built with. A release shorter than the run's `model.max_seq_len` has its
position tables extended (finetune.positions: `copy`, the default, or `interpolate`); positions that the
first phase had but never saw filled are simply trained now.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun pretrain/phases.py): the project root, as main.py does
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(_here)]
    sys.path.insert(0, str(Path(_here).parent))

import argparse
from collections.abc import Callable, Sequence

from torch import nn

from hypermixer import EncoderConfig

# Settings a phase may change: the length, and regularisation. Everything else must be the release's.
MAY_DIFFER = ("max_seq_len", "dropout", "attention_dropout", "extra", "mlpmixer_token_mixing_size")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="pretrain.phases",
        description="A pretraining run initialised from a release (a previous phase); other arguments: pretrain/main.py's",
    )
    parser.add_argument("--init-from", required=True, metavar="RELEASE", help="a release folder from pretrain.export")
    parser.add_argument(
        "--extend-positions",
        choices=("copy", "interpolate"),
        default="copy",
        help="how a release shorter than the run's model.max_seq_len is extended (default: copy)",
    )
    return parser.parse_known_args(argv)


def check_release(release: Path, data_path: str | None) -> list[str]:
    """What keeps `release` from starting a run on `data_path` (its files, and the data's tokenizer)."""
    from common.files import sha256_file
    from data_pipeline.errors import DataPipelineError
    from data_pipeline.shards import read_manifest

    problems = []
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (release / name).is_file():
            problems.append(
                f"--init-from: {release / name}: no such file (is {release} a release from pretrain.export?)"
            )
    if problems or not data_path:
        return problems
    try:
        manifest = read_manifest(data_path)
    except DataPipelineError:
        return []  # the run's own config check reports it
    if sha256_file(release / "tokenizer.json") != manifest["tokenizer"].get("sha256"):
        problems.append(
            f"--init-from: {release}'s tokenizer differs from the one {data_path} was built with; build this "
            f"phase's data with the release's tokenizer (data_pipeline build --tokenizer {release / 'tokenizer.json'})"
        )
    return problems


def release_model(release: Path, extend: str) -> Callable[[EncoderConfig], nn.Module]:
    """build_model for pretrain.trainer.run: the run's masked LM with the release's weights."""

    def build(config: EncoderConfig) -> nn.Module:
        from finetune.errors import FinetuneError
        from finetune.positions import extend_positions
        from hypermixer import ForMaskedLM
        from pretrain.config import ConfigError

        pretrained = ForMaskedLM.from_pretrained(release)
        mine, theirs = config.to_dict(), pretrained.config.to_dict()
        differ = [
            f"{k}: the release's {theirs[k]!r}, this run's {v!r}"
            for k, v in mine.items()
            if k not in MAY_DIFFER and theirs.get(k) != v
        ]
        if differ:
            raise ConfigError([f"--init-from {release}: another architecture ({d})" for d in differ])
        if pretrained.config.max_seq_len > config.max_seq_len:
            raise ConfigError(
                [
                    f"--init-from {release}: the release reads {pretrained.config.max_seq_len} tokens, this run's model "
                    f"{config.max_seq_len}; set model.max_seq_len={pretrained.config.max_seq_len}"
                ]
            )
        try:
            extend_positions(pretrained, config.max_seq_len, extend)
        except FinetuneError as err:  # mlpmixer: no position table to extend
            raise ConfigError([f"--init-from {release}: {err}"]) from None
        model = ForMaskedLM(config)  # the run's dropouts and length
        model.load_state_dict(pretrained.state_dict(), strict=True)
        return model

    return build


def main(argv: Sequence[str] | None = None) -> int:
    from pretrain import main as entry
    from pretrain.config import ConfigError, load_config

    args, rest = parse_args(argv)
    release = Path(args.init_from)
    try:
        config_args = entry.parse_args(rest)
        config = load_config(config_args.config, config_args.overrides)
        problems = check_release(release, config.data.path)
        if problems:
            raise ConfigError(problems)
    except ConfigError as err:
        print(f"pretrain: {err}", file=sys.stderr, flush=True)
        return entry.EXIT_CONFIG
    return entry.main(rest, build_model=release_model(release, args.extend_positions))


if __name__ == "__main__":
    sys.exit(main())
