"""docs/results.md is generated from bench/results (python -m bench.report) and must match; measured figures
live there only: the notes state them through placeholders, and README and the other docs carry none."""

import json
import re
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[1]
# A number standing as a word: not part of a name (SST-2, fp32, H200), a version or a path.
NUMBER = re.compile(r"(?<![\w\-./=])[+-]?\d[\d,]*(?:\.\d+)?%?(?![\w.]\w)")
# A figure as results print it: a decimal or a percentage with at least three digits (5.774, 18.1%, 77.1).
FIGURE = re.compile(r"(?<![\w\-./])\d[\d,]*(?:\.\d+)?%?(?![\w.]\w)")
GENERATED = {"results.md", "config.md"}  # written by bench.report and tools.config_reference
# figures that happen to equal one of ours: published scores quoted from elsewhere, and example output lines
CITED = {"finetune.md": {"78.9", "80.5"}, "pretrain.md": {"0.00", "0.04", "0.95"}}


def prose(text: str) -> str:
    """Text without code blocks, code spans, link targets, HTML comments and placeholders."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    return report.PLACEHOLDER.sub("", text)


def figures(text: str) -> set[str]:
    found = set()
    for token in FIGURE.findall(text):
        digits = re.sub(r"\D", "", token)
        if len(digits) >= 3 and ("." in token or token.endswith("%")):
            found.add(token)
    return found


def test_docs_results_md_regenerates_byte_for_byte(tmp_path):
    out = tmp_path / "results.md"
    assert report.main(["--out", str(out)]) == 0
    committed = report.DOC.read_bytes()
    assert out.read_bytes() == committed, f"{report.DOC} is out of date; regenerate it with: {report.REGENERATE}"
    assert report.main(["--check", "--out", str(out)]) == 0


def test_every_results_file_has_a_section_with_its_file_and_command():
    text = report.DOC.read_text(encoding="utf-8")
    results = report.RESULTS
    files = sorted([*results.glob("*.json"), *results.glob("*/results.json")])
    assert files
    for path in files:
        assert f"({Path('..') / path.relative_to(ROOT)})" in text, f"{path} has no section in {report.DOC}"
    for result in report.discover():
        data = json.loads(result.files[0].read_text())
        recorded = isinstance(data, dict) and "command" in data
        assert recorded or result.notes.commands, f"{result.files[0]}: no command in the file or its notes"


def test_notes_state_figures_only_through_placeholders():
    notes = sorted([*report.RESULTS.glob("*.notes.md"), *report.RESULTS.glob("*/notes.md")])
    assert notes
    for path in notes:
        text = path.read_text(encoding="utf-8")
        body = text.split("\n---\n", 1)[1] if text.startswith("---\n") else text  # commands may hold numbers
        title = re.search(r"^title:(.*)$", text, flags=re.MULTILINE)
        bare = NUMBER.findall(prose(body + (title.group(1) if title else "")))
        assert not bare, f"{path}: bare numbers {bare}; state a measured figure as {{{{path/in/results.json:format}}}}"


def test_readme_and_docs_carry_no_measured_figures():
    """Measured figures are in docs/results.md only; a copy elsewhere would go stale when a result changes."""
    measured = figures(report.DOC.read_text(encoding="utf-8"))
    assert len(measured) > 100  # the page holds the results
    docs = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in GENERATED)]
    for path in docs:
        stale = sorted(figures(path.read_text(encoding="utf-8")) & measured - CITED.get(path.name, set()))
        assert not stale, f"{path}: {stale} are results figures; link docs/results.md instead of copying them"


def test_a_bad_placeholder_or_front_matter_fails_in_one_line(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"command": "python -m bench.x", "loss": [6.5, 5.25]}))
    (folder / "notes.md").write_text("---\ntitle: a run\n---\nends at {{loss/-1:.2f}}\n")
    page = report.generate(tmp_path)
    assert "ends at 5.25" in page and "Command: `python -m bench.x`" in page and "| `loss` | 6.500, 5.250 |" in page
    (folder / "notes.md").write_text("ends at {{accuracy/-1:.2f}}\n")
    with pytest.raises(SystemExit, match=r"notes\.md: \{\{accuracy/-1\}\}: no 'accuracy' in the results$"):
        report.generate(tmp_path)
    (folder / "notes.md").write_text("---\ntitel: a run\n---\n")
    with pytest.raises(SystemExit, match="front matter line 'titel: a run'"):
        report.generate(tmp_path)


def test_the_pretrain_module_table_names_modules_that_exist():
    text = (ROOT / "docs" / "pretrain.md").read_text(encoding="utf-8")
    table = text.split("| role | where |", 1)[1].split("\n\n", 1)[0]
    named = re.findall(r"`([\w/]+(?:\.py|/))`", table)
    assert "step.py" in named and "watchdog.py" in named
    missing = [name for name in named if not (ROOT / "pretrain" / name).exists()]
    assert not missing, f"docs/pretrain.md's module table names {missing}, which pretrain/ does not have"


def anchors(path: Path) -> set[str]:
    """The anchors a markdown page has: explicit ids and GitHub's slugs of its headings."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


def test_links_in_readme_and_docs_point_to_files_and_anchors_that_exist():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            name, _, anchor = target.partition("#")
            path = (page.parent / name).resolve() if name else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
