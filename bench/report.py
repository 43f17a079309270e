"""docs/results.md from the committed benchmark results: `python -m bench.report` (`--check`, `--out PATH`).

Each result is a JSON file: `bench/results/<name>.json`, or a folder `bench/results/<name>/` with a
`results.json` (plus any other `*.json` it holds). Every file gets a section with the command that wrote it
and its tables; known kinds (bench.quality, bench.models, bench.mlm_copy, bench.pretrain wikitext, a
finetune sweep, bench.corpus, bench.long, bench.tuning) have their own tables, anything else is shown by a
generic renderer, so a new folder appears by itself (bench.tuning's trials.json, a record for reruns, is not
shown). The prose that explains a result lives beside it, in `<name>/notes.md` (a folder) or
`<name>.notes.md` (a file):

    ---
    title: a heading (placeholders allowed)
    order: 40                 (sections sort by order, then name; without notes: last)
    command: python -m ...    (only when the JSON holds no "command"; repeatable)
    ---
    prose shown before the tables, with {{path/in/results.json:format}} placeholders
    <!-- tables -->
    prose shown after them

Placeholders are the only way a note states a figure (a test refuses bare numbers in notes): a path of
keys, list indices (negative from the end) or, in a list of records, a record's `name`; the format is
Python's format spec (`.3f`, `.1%`, `,`). The output is a pure function of the files: sorted, fixed
formats, so it regenerates byte for byte (tests/test_docs_results.py checks it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.models import format_table, summary_lines
from bench.quality import downstream_table, pretraining_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "results.md"
REGENERATE = "python -m bench.report"
TABLES_MARK = "<!-- tables -->"
PLACEHOLDER = re.compile(r"\{\{\s*([^}:]+?)\s*(?::([^}]*))?\}\}")
NO_NOTES_ORDER = 1000
TASK_SCORES = {"SST-2": "accuracy", "CoLA": "MCC", "MRPC": "mean of F1 and accuracy", "RTE": "accuracy"}
RECORDS = {"trials.json"}  # bench.tuning's per-trial record, which a rerun continues from: not a table
MODELS_KEYS = {"mixer", "length", "batch_size", "tokens_per_s", "step_s", "step_mem_mib", "tflops"}  # format_table's


class ReportError(SystemExit):
    """A results or notes file the report cannot read: one line naming the file and what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench.report: {message}")


@dataclass
class Notes:
    title: str | None = None
    order: int = NO_NOTES_ORDER
    commands: list[str] = field(default_factory=list)
    before: str = ""
    after: str = ""


@dataclass
class Result:
    name: str  # the folder or the file's stem
    files: list[Path]  # results.json first, then the folder's other JSON files
    notes: Notes
    notes_path: Path | None


# ---------------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: cannot read it as JSON ({err})") from None


def parse_notes(path: Path) -> Notes:
    text = path.read_text(encoding="utf-8")
    notes = Notes()
    if text.startswith("---\n"):
        head, sep, text = text[4:].partition("\n---\n")
        if not sep:
            raise ReportError(f"{path}: the front matter opened by '---' is not closed by a '---' line")
        for line in head.splitlines():
            key, colon, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if not colon or key not in ("title", "order", "command"):
                raise ReportError(f"{path}: front matter line {line!r}: expected title:, order: or command:")
            if key == "title":
                notes.title = value
            elif key == "order":
                if not value.isdigit():
                    raise ReportError(f"{path}: order: {value!r} is not a whole number")
                notes.order = int(value)
            else:
                notes.commands.append(value)
    before, sep, after = text.partition(TABLES_MARK)
    notes.before, notes.after = (before.strip(), after.strip()) if sep else ("", before.strip())
    return notes


def discover(results: Path = RESULTS) -> list[Result]:
    found = []
    for folder in sorted(p for p in results.iterdir() if (p / "results.json").is_file()):
        others = sorted(p for p in folder.glob("*.json") if p.name != "results.json" and p.name not in RECORDS)
        found.append(_result(folder.name, [folder / "results.json", *others], folder / "notes.md"))
    for path in sorted(results.glob("*.json")):
        found.append(_result(path.stem, [path], results / f"{path.stem}.notes.md"))
    return sorted(found, key=lambda r: (r.notes.order, r.name))


def _result(name: str, files: list[Path], notes_path: Path) -> Result:
    exists = notes_path.is_file()
    return Result(name, files, parse_notes(notes_path) if exists else Notes(), notes_path if exists else None)


# ---------------------------------------------------------------------------------------------- placeholders


def lookup(data: Any, path: str) -> Any:
    value = data
    for part in path.split("/"):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, list) and any(isinstance(v, dict) and v.get("name") == part for v in value):
            value = next(v for v in value if isinstance(v, dict) and v.get("name") == part)
        else:
            raise KeyError(part)
    return value


def fill(text: str, data: Any, where: Path) -> str:
    def one(match: re.Match) -> str:
        path, spec = match.group(1), match.group(2) or ""
        try:
            return format(lookup(data, path), spec)
        except KeyError as err:
            raise ReportError(f"{where}: {{{{{path}}}}}: no {err} in the results") from None
        except (TypeError, ValueError) as err:
            raise ReportError(f"{where}: {{{{{path}:{spec}}}}}: {err}") from None

    return PLACEHOLDER.sub(one, text)


# ---------------------------------------------------------------------------------------------- formats


def number(value: Any) -> str:
    """A fixed format per magnitude, so that a value always prints the same way."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.3g}"
    return str(value)


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def table(head: list[str], rows: list[list[str]], right: int = 1) -> list[str]:
    align = ["---"] * right + ["---:"] * (len(head) - right)
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def link(path: Path) -> str:
    if not path.is_relative_to(ROOT):  # results outside the project (tests): the path as it is
        return f"[{path.name}]({path.as_posix()})"
    relative = path.relative_to(ROOT).as_posix()
    return f"[{relative}](../{relative})"


# ---------------------------------------------------------------------------------------------- generic


def render_generic(data: Any) -> list[str]:
    """Scalars as a key/value table; lists of records and records of records as tables; deeper nesting
    is left to the file."""
    if isinstance(data, list):
        return _records_table(data) if all(isinstance(r, dict) for r in data) else [", ".join(map(number, data))]
    if not isinstance(data, dict):
        return [number(data)]
    lines: list[str] = []
    scalars = [[f"`{k}`", number(v)] for k, v in data.items() if is_scalar(v) and k != "command"]
    scalars += [[f"`{k}`", ", ".join(map(number, v)) or "-"] for k, v in data.items() if _scalar_list(v)]
    if scalars:
        lines += table(["key", "value"], scalars, right=2)
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            lines += ["", f"`{key}`:", "", *_records_table(value)]
        elif isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            lines += ["", f"`{key}`:", "", *_records_table([{"": k, **v} for k, v in value.items()])]
    return lines


def _scalar_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_scalar(v) for v in value)


def _records_table(records: list[dict]) -> list[str]:
    columns: list[str] = []
    for record in records:
        columns += [k for k, v in record.items() if is_scalar(v) and k not in columns]
    rows = [[number(r.get(c)) for c in columns] for r in records]
    return table(columns, rows)


# ---------------------------------------------------------------------------------------------- known kinds


def render_quality(data: dict) -> list[str]:
    size = data["size"]
    lines = [
        f"Corpus: {data['corpus']}; recipe `{data['recipe']}`; {size['steps']:,} steps x {size['global_batch']} "
        f"sequences per model, {size['procs']} process(es), held-out evaluation every {size['eval_every']} steps.",
        "",
        "Final held-out masked-LM evaluation:",
        "",
        *pretraining_table(list(data["pretraining"].values())),
    ]
    if data.get("ablation"):
        lines += ["", "Ablation (no LayerNorm on the embeddings):", "", *pretraining_table(data["ablation"])]
    if data.get("sweep"):
        lines += ["", "Sweep (peak learning rate and global batch):", "", *pretraining_table(data["sweep"])]
    lines += ["", *curve_table(data)]
    if data.get("downstream"):
        tasks = [
            t["task"]
            for t in size["tasks"]
            if any(t["task"] in m.get("pretrained", {}) for m in data["downstream"].values())
        ]
        lines += [
            "",
            "Fine-tuning, dev sets, mean ± std over seeds "
            f"{', '.join(map(str, size['seeds']))}, x100 ("
            + ", ".join(f"{t}: {TASK_SCORES.get(t, 'task score')}" for t in tasks)
            + "):",
            "",
            *downstream_table(data["downstream"], data["majority"], tasks),
            "",
            *table(
                ["task", "lr", "epochs", "max seq len", "training examples"],
                [
                    [
                        t["task"],
                        f"{t['lr']:g}",
                        str(t["epochs"]),
                        str(t["max_seq_len"]),
                        number(t["max_train_examples"] or "all"),
                    ]
                    for t in size["tasks"]
                    if t["task"] in tasks
                ],
            ),
        ]
    return lines


def curve_table(data: dict) -> list[str]:
    """Held-out loss / accuracy at every evaluation, one column per model, plus the files' relative gaps
    to the Hugging Face BERT reference."""
    curves = [*data["pretraining"].values(), *data.get("ablation", [])]
    first = curves[0]
    steps = {t: round(t * first["steps"] / first["tokens"][-1]) for t in first["tokens"]}
    head = ["step", *(c["name"] for c in curves)]
    gaps = [
        (key, {g["tokens"]: g["relative"] for g in data[key]})
        for key in ("reference_gap", "reference_gap_post")
        if data.get(key)
    ]
    head += [f"{'transformer-post' if key.endswith('post') else 'transformer'} vs bert-hf, loss" for key, _ in gaps]
    rows = []
    for tokens, step in steps.items():
        cells = [f"{step:,}"]
        for c in curves:
            at = dict(zip(c["tokens"], zip(c["loss"], c["accuracy"])))
            cells.append(f"{at[tokens][0]:.3f} / {100 * at[tokens][1]:.1f}%" if tokens in at else "-")
        cells += [f"{100 * gap[tokens]:+.1f}%" if tokens in gap else "-" for _, gap in gaps]
        rows.append(cells)
    return ["Held-out masked-LM loss / accuracy at each evaluation:", "", *table(head, rows)]


def render_models(rows: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}  # bench.models prints one table per attention dropout
    for row in rows:
        groups.setdefault(f"attention dropout {row['attention_dropout']:g}", []).append(row)
    lines: list[str] = []
    for title, group in groups.items():
        if lines:
            lines.append("")
        lines += [f"{title}:", "", format_table(group, None), "", *(f"- {s}" for s in summary_lines(group))]
    return lines


def render_mlm_copy(data: dict) -> list[str]:
    releases = list(data)
    groups = [
        g for g in data[releases[0]] if isinstance(data[releases[0]][g], dict) and "accuracy" in data[releases[0]][g]
    ]
    rows = [
        [g, number(data[releases[0]][g]["masked"]), *(f"{100 * data[r][g]['accuracy']:.1f}%" for r in releases)]
        for g in groups
    ]
    return ["Held-out masked-LM accuracy by group:", "", *table(["group", "masked", *releases], rows)]


def render_pretrain_curves(data: dict) -> list[str]:
    head = ["model", "held-out MLM loss", "held-out MLM accuracy", "tokens/s", "minutes"]
    rows = [
        [
            name,
            f"{c['val_loss'][-1]:.3f}",
            f"{100 * c['val_accuracy'][-1]:.1f}%",
            f"{c['tokens_per_s']:,.0f}",
            f"{c['wall_seconds'] / 60:.1f}",
        ]
        for name, c in data["curves"].items()
    ]
    scalars = {k: v for k, v in data.items() if is_scalar(v)}
    return [*render_generic(scalars), "", f"After {data['steps']:,} steps:", "", *table(head, rows)]


def render_finetune_sweep(data: dict) -> list[str]:
    head = ["model", "init", "task", "median over seeds", "best run", "lr", "seeds"]
    rows = []
    for name, model in data["models"].items():
        for task, s in model["tasks"].items():
            median, best = s["median"], s["best"]
            rows.append(
                [
                    name,
                    "scratch" if model["from_scratch"] else "pretrained",
                    task,
                    f"{100 * median['score']:.1f}",
                    f"{100 * best['score']:.1f}",
                    f"{median['learning_rate']:g}",
                    str(len(median["seeds"])),
                ]
            )
    return [
        f"{data['runs_done']} of {data['runs_planned']} planned runs done; dev scores x100.",
        "",
        *table(head, rows, right=3),
    ]


def render_gpu(data: dict) -> list[str]:
    """bench.gpu's --json: its cells by table title, in bench.models' format with MFU."""
    from bench.gpu import H100_BF16_TFLOPS

    lines = [f"{data['device']}; MFU against {H100_BF16_TFLOPS:g} TFLOP/s (dense bf16)."]
    for title, rows in data["cells"].items():
        for compiled in sorted({bool(r.get("compile")) for r in rows}):
            group = [r for r in rows if bool(r.get("compile")) == compiled]
            lines += [
                "",
                f"{title}{' (torch.compile)' if compiled else ''}:",
                "",
                format_table(group, H100_BF16_TFLOPS),
            ]
    return lines


def render_corpus(data: dict) -> list[str]:
    from bench.corpus import tables

    return tables(data)


def render_long(data: dict) -> list[str]:
    from bench.long import tables

    return tables(data)


def render_tuning(data: dict) -> list[str]:
    from bench.tuning import tables

    return tables(data)


def render_recipe_sweep(data: dict) -> list[str]:
    from bench.recipe_sweep import table

    return table(data)


def kind(data: Any) -> str:
    if isinstance(data, dict) and "pretraining" in data and "releases" in data and "split" in data:
        return "corpus"
    if isinstance(data, dict) and "sweep_tokens" in data and "runs" in data:
        return "recipe_sweep"
    if isinstance(data, dict) and "cells_planned" in data and "finetune" in data and "pretrain" in data:
        return "long"
    if isinstance(data, dict) and "paper_claim" in data and "evp" in data:
        return "tuning"
    if isinstance(data, dict) and "cells" in data and "device" in data:
        return "gpu"
    if isinstance(data, dict) and "pretraining" in data and "size" in data:
        return "quality"
    if (
        isinstance(data, list)
        and data
        and all(isinstance(r, dict) and (MODELS_KEYS <= set(r) or {"mixer", "length", "error"} <= set(r)) for r in data)
    ):
        return "models"
    if isinstance(data, dict) and "curves" in data and "steps" in data:
        return "pretrain_curves"
    if isinstance(data, dict) and "models" in data and "runs_planned" in data:
        return "finetune_sweep"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "repeated, rare" in v for v in data.values()):
        return "mlm_copy"
    return "generic"


RENDERERS: dict[str, Callable[[Any], list[str]]] = {
    "quality": render_quality,
    "models": render_models,
    "pretrain_curves": render_pretrain_curves,
    "finetune_sweep": render_finetune_sweep,
    "mlm_copy": render_mlm_copy,
    "gpu": render_gpu,
    "corpus": render_corpus,
    "recipe_sweep": render_recipe_sweep,
    "long": render_long,
    "tuning": render_tuning,
    "generic": render_generic,
}


# ---------------------------------------------------------------------------------------------- the page

INTRO = """\
# Results

<!-- Generated by `python -m bench.report` from bench/results/; edit the notes there, not this file. -->

Every figure on this page is read from a file in `bench/results/`, named under its heading together with
the command that wrote it; the prose beside a result comes from that folder's `notes.md`. Unless a
section says otherwise, the runs were made on a small CPU machine that was often shared with other work:
losses, accuracies and ratios taken within one run compare, minutes and tokens/s across runs do not.
Where a claim is a reading of one seed, its notes say so. To regenerate this page after adding or
changing a result: `python -m bench.report`."""


def title_of(result: Result, data: Any) -> str:
    return fill(result.notes.title, data, result.notes_path or result.files[0]) if result.notes.title else result.name


def section(result: Result) -> list[str]:
    data = read_json(result.files[0])
    title = title_of(result, data)
    commands = result.notes.commands or ([data["command"]] if isinstance(data, dict) and "command" in data else [])
    lines = [f'<a id="{result.name}"></a>', "", f"## {title}", ""]
    if len(commands) == 1:
        lines.append(f"Command: `{commands[0]}`")
    else:
        lines += ["Commands:" if commands else "Command: not recorded", *(f"- `{c}`" for c in commands)]
    lines += ["", "Files: " + ", ".join(link(p) for p in result.files) + "."]
    where = result.notes_path or result.files[0]
    if result.notes.before:
        lines += ["", fill(result.notes.before, data, where)]
    for path in result.files:
        content = data if path == result.files[0] else read_json(path)
        if path != result.files[0]:
            lines += ["", f"From `{path.name}`:"]
        lines += ["", *RENDERERS[kind(content)](content)]
    pictures = sorted(result.files[0].parent.glob("*.png")) if result.files[0].name == "results.json" else []
    if pictures:
        lines += ["", "Figures: " + ", ".join(link(p) for p in pictures) + "."]
    if result.notes.after:
        lines += ["", fill(result.notes.after, data, where)]
    return lines


def generate(results: Path = RESULTS) -> str:
    found = discover(results)
    contents = [f"- [{title_of(r, read_json(r.files[0]))}](#{r.name})" for r in found]
    lines = [INTRO, "", *contents]
    for result in found:
        lines += ["", *section(result)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOC, help=f"where to write (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"bench.report: {args.out} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    temporary = args.out.with_name(args.out.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(args.out)  # never a half-written page
    print(f"bench.report: wrote {args.out}")
    for name in untracked(RESULTS):
        print(f"bench.report: {name} is not in git yet: commit it with the page, which shows it", file=sys.stderr)
    return 0


def untracked(results: Path) -> list[str]:
    """Results files the page was made from that git does not track: a clone would lack them (and the page
    would name files it does not have). Empty outside a git checkout."""
    import subprocess

    try:
        listed = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard", "--", str(results)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    used: set[Path] = set()
    for result in discover(results):
        used |= {*result.files, *([result.notes_path] if result.notes_path else [])}
        if result.files[0].name == "results.json":  # its figures are linked too
            used |= set(result.files[0].parent.glob("*.png"))
    return sorted(name for name in listed if ROOT / name in used)


if __name__ == "__main__":
    sys.exit(main())
