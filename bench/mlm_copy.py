"""Where held-out masked-LM accuracy comes from: masked tokens that a model could copy from their own
sequence against those it cannot, side by side for several releases.

    python -m bench.mlm_copy --heldout bench/results/quality-tapt-2k/data/heldout \\
        --release hypermixer=bench/results/quality-tapt-2k/releases/hypermixer \\
        --release transformer=bench/results/quality-tapt-2k/releases/transformer
    python -m bench.mlm_copy --heldout DIR --release early=DIR1 --release late=DIR2 --tokens 15
                                    # also: the 15 tokens the last release predicts best over the first

Every masked position falls in one group:
- `repeated, rare`: its original token also stands, visible, elsewhere in the same sequence, and is not one
  of the held-out text's `--frequent` most common tokens (names and terms an article repeats);
- `repeated, frequent`: visible elsewhere, but one of the most common tokens (the, of, a comma, ...);
- `not repeated`: nowhere else in the sequence.
Attention can fetch one particular context token; HyperMixer's token mixing passes the sequence through a
d'-wide summary. If that is why the transformer pulls ahead late in pretraining, its lead over HyperMixer is
largest in `repeated, rare`. Comparing models within a group controls for how hard the group's words are.

Masks are drawn as the trainer's evaluation draws them (`pretrain.data.validation_batches`, `--seed`), on
the first `--max-samples` held-out sequences. The releases must share the held-out data's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import load_tokenizer
from hypermixer import ForMaskedLM
from hypermixer.heads import IGNORE_INDEX
from pretrain.data import Masking, validation_batches

GROUPS = ("repeated, rare", "repeated, frequent", "not repeated")


def copy_groups(input_ids: torch.Tensor, labels: torch.Tensor, frequent: torch.Tensor) -> torch.Tensor:
    """The GROUPS index of every labelled position, in `labels[labels != IGNORE_INDEX]` order.
    input_ids, labels: (B, N); frequent: a bool table over the vocabulary."""
    selected = labels != IGNORE_INDEX
    targets = torch.where(selected, labels, torch.full_like(labels, -1))
    same = input_ids.unsqueeze(1) == targets.unsqueeze(2)  # (B, i, j): position j shows i's original token
    same &= ~torch.eye(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)  # not i itself
    repeated = same.any(dim=2)[selected]
    common = frequent[labels[selected]]
    return torch.where(repeated, torch.where(common, 1, 0), 2)


def frequent_table(batches: list[dict], masking: Masking, count: int) -> torch.Tensor:
    """True for the `count` most common non-special ids among the evaluated sequences' original tokens
    (the label where a position is masked, the input elsewhere)."""
    counts = torch.zeros(masking.vocab_size, dtype=torch.int64)
    for batch in batches:
        labels = batch["labels"]
        original = torch.where(labels != IGNORE_INDEX, labels, batch["input_ids"])
        counts += torch.bincount(original.flatten(), minlength=masking.vocab_size)
    counts[torch.from_numpy(masking.special)] = 0
    table = torch.zeros(masking.vocab_size, dtype=torch.bool)
    table[torch.argsort(counts, descending=True, stable=True)[:count]] = True
    return table


@torch.no_grad()
def measure(model: ForMaskedLM, batches: list[dict], frequent: torch.Tensor) -> dict:
    """Accuracy and count per group, and per target token id (`by_token`: id -> [correct, masked])."""
    vocab = len(frequent)
    correct, total = torch.zeros(len(GROUPS)), torch.zeros(len(GROUPS))
    token_correct, token_total = torch.zeros(vocab), torch.zeros(vocab)
    for batch in batches:
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        hit = (out.logits.argmax(dim=-1) == targets).float()
        group = copy_groups(batch["input_ids"], batch["labels"], frequent)
        correct.index_add_(0, group, hit)
        total += torch.bincount(group, minlength=len(GROUPS)).float()
        token_correct.index_add_(0, targets, hit)
        token_total += torch.bincount(targets, minlength=vocab).float()
    groups = {
        name: {"accuracy": float(correct[g] / total[g]) if total[g] else float("nan"), "masked": int(total[g])}
        for g, name in enumerate(GROUPS)
    }
    seen = token_total.nonzero().flatten().tolist()
    return {**groups, "by_token": {i: [int(token_correct[i]), int(token_total[i])] for i in seen}}


def gain_table(results: dict, tokenizer_file: Path, count: int) -> list[str]:
    """The `count` target tokens whose correct predictions grow most from the first release to the last:
    which words a later or better model learned (held-out counts out of all masked positions)."""
    tokenizer = load_tokenizer(tokenizer_file)
    (first_name, first), (last_name, last) = next(iter(results.items())), list(results.items())[-1]
    masked = sum(n for _, n in last["by_token"].values())
    gains = {i: last["by_token"][i][0] - first["by_token"][i][0] for i in last["by_token"]}
    lines = [
        f"| token | masked | correct, {first_name} | correct, {last_name} | gain | gain, points of accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i in sorted(gains, key=lambda i: -gains[i])[:count]:
        n = last["by_token"][i][1]
        lines.append(
            f"| `{tokenizer.id_to_token(i)}` | {n:,} | {first['by_token'][i][0]:,} | {last['by_token'][i][0]:,} "
            f"| {gains[i]:+,} | {100 * gains[i] / masked:+.2f} |"
        )
    total = sum(gains.values())
    lines.append(f"| all tokens | {masked:,} | | | {total:+,} | {100 * total / masked:+.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heldout", type=Path, required=True, help="a data_pipeline build of the held-out text")
    parser.add_argument("--split", default="train", help="the build's split to read (bench.quality: train)")
    parser.add_argument("--release", action="append", required=True, metavar="NAME=DIR", help="repeatable")
    parser.add_argument("--max-samples", type=int, default=1024)
    parser.add_argument("--frequent", type=int, default=100, help="how many of the commonest tokens are 'frequent'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokens", type=int, default=0, help="also list the N tokens the last release gains most on over the first"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    releases = {}
    for item in args.release:
        name, sep, directory = item.partition("=")
        if not sep or not Path(directory, "config.json").is_file():
            print(f"--release {item}: expected NAME=DIR with a release (config.json) in DIR", file=sys.stderr)
            return 2
        releases[name] = Path(directory)
    if not (args.heldout / "manifest.json").is_file():
        print(f"--heldout {args.heldout}: no manifest.json (build it with data_pipeline)", file=sys.stderr)
        return 2

    manifest = read_manifest(args.heldout)
    masking = Masking(manifest["special_ids"], manifest["vocab_size"])
    batches = list(validation_batches(manifest, args.split, masking, args.seed, 0, 1, 32, args.max_samples))
    frequent = frequent_table(batches, masking, args.frequent)
    results = {}
    for name, directory in releases.items():
        model = ForMaskedLM.from_pretrained(directory).eval()
        if model.config.vocab_size != int(manifest["vocab_size"]):
            print(
                f"--release {name}={directory}: vocabulary of {model.config.vocab_size:,}, but {args.heldout} was "
                f"built with {int(manifest['vocab_size']):,}: the release and the held-out data need one tokenizer",
                file=sys.stderr,
            )
            return 2
        results[name] = measure(model, batches, frequent)

    first = next(iter(results.values()))
    print(f"held-out masked-LM accuracy by group ({args.max_samples} sequences, {args.frequent} frequent tokens)\n")
    print("| group | masked | " + " | ".join(results) + " |")
    print("|---|---:|" + "---:|" * len(results))
    for group in GROUPS:
        cells = " | ".join(f"{r[group]['accuracy']:.1%}" for r in results.values())
        print(f"| {group} | {first[group]['masked']:,} | {cells} |")
    if args.tokens and len(results) > 1:
        print("\n" + "\n".join(gain_table(results, releases[next(reversed(releases))] / "tokenizer.json", args.tokens)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
