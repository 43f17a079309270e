"""Count what a run trained on against the global sample order: `python -m pretrain.sample_audit RUN_DIR`.

Reads `<run>/sample_ids.jsonl` (written with `metrics.sample_ids=true`; a resumed run repeats the steps after
its checkpoint and the last record of a step counts) and the config of the run's newest checkpoint, and
prints one line: the sequences trained on in the first epoch, how many of them were repeats, how many the
order uses were missed, and whether every step took exactly the global micro-batches the order says
(`pretrain.data.global_order`, computed from the manifest's counts alone). Exit 1 if anything is off.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.shards import read_manifest
from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError, PretrainConfig, from_dict
from pretrain.data import Layout, global_order, shards_of
from pretrain.sample_ids import SAMPLE_IDS_FILE, read_sample_ids


@dataclass(frozen=True)
class SampleCount:
    steps: int
    sequences: int  # trained on, whole run
    epoch_sequences: int  # trained on in the first epoch (or as much of it as the run covers)
    repeated: int  # in the first epoch
    missing: int  # of the first epoch's ordered sequences, when the run covered it whole; else 0
    ordered: int  # sequences the order uses per epoch
    split: int  # sequences in the train split
    in_order: bool  # every step took the global micro-batches the order says

    @property
    def ok(self) -> bool:
        return self.repeated == 0 and self.missing == 0 and self.in_order

    def line(self) -> str:
        return (
            f"{self.steps} steps, {self.sequences} sequences; epoch 0: {self.epoch_sequences} trained on, "
            f"{self.repeated} repeated, {self.missing} missing of the {self.ordered} the order uses "
            f"({self.split} in the split); every step in the global order: {'yes' if self.in_order else 'NO'}"
        )


def count(run_dir: Path, config: PretrainConfig) -> SampleCount:
    d = config.data
    train = shards_of(read_manifest(d.path), "train")
    layout = Layout(0, 1, 0, config.batch.micro_batch_size, d.streams)  # the order does not depend on the layout
    taken = read_sample_ids(run_dir)
    seen = [row for rows in taken.values() for row in rows]

    def epoch(index: int) -> list[tuple[int, int]]:
        order = global_order(train, layout, config.seed, index, d.shuffle, d.shuffle_shards)
        return [row for mb in order for row in mb]

    first_epoch = epoch(0)
    expected = list(first_epoch)
    while len(expected) < len(seen):
        expected += epoch(len(expected) // len(first_epoch))
    first = seen[: len(first_epoch)]
    return SampleCount(
        steps=len(taken),
        sequences=len(seen),
        epoch_sequences=len(first),
        repeated=len(first) - len(set(first)),
        missing=len(set(first_epoch) - set(first)) if len(first) == len(first_epoch) else 0,
        ordered=len(first_epoch),
        split=sum(s.samples for s in train),
        in_order=list(taken) == list(range(1, len(taken) + 1)) and seen == expected[: len(seen)],
    )


def audit(run_dir: Path, checkpoints: Path | None = None) -> SampleCount:
    """`count` with the config of the run's newest complete checkpoint."""
    folder = ckpt.resolve_checkpoint(checkpoints or run_dir / "checkpoints")
    state = ckpt.read_state(folder)
    config, problems = from_dict(state["config"], default_source=f"the config saved in {folder}")
    if problems:
        raise ConfigError(problems)
    return count(run_dir, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.sample_audit", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run's output_dir (trained with metrics.sample_ids=true)")
    parser.add_argument(
        "--checkpoints", type=Path, default=None, help="its checkpoint dir (default RUN_DIR/checkpoints)"
    )
    args = parser.parse_args(argv)
    if not (args.run_dir / SAMPLE_IDS_FILE).is_file():
        print(f"{args.run_dir}: no {SAMPLE_IDS_FILE} (train with --set metrics.sample_ids=true)", file=sys.stderr)
        return 2
    try:
        result = audit(args.run_dir, args.checkpoints)
    except (FileNotFoundError, ValueError) as err:  # no complete checkpoint, an unreadable state or config
        print(f"{args.run_dir}: {err}", file=sys.stderr)
        return 2
    print(result.line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
