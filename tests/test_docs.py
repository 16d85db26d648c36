"""The documentation stays true to the tree: every relative link of README.md and docs/*.md
points to a file (and, into a Markdown page, to a heading) that exists; README.md stays short
and names every command, method and benchmark of the registries the code dispatches on."""
import re
from pathlib import Path

import pytest

from trainers.bench import BENCHMARKS
from trainers.cli import COMMANDS
from trainers.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300
# Pages other work of issue 22 writes; README and docs/benchmarks.md link them ahead of time.
# Remove a name once its page is merged.
PENDING_PAGES = {"docs/fairness.md"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _text(page: Path) -> str:
    """The page without its fenced code blocks (a link-like string in code is not a link)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _text(page).splitlines():
        found = re.match(r"#{1,6} (.+)", line)
        if not found:
            continue
        slug = _slug(found.group(1))
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _relative_links(page: Path):
    for target in LINK.findall(_text(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in _relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        shown = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            if shown not in PENDING_PAGES:
                broken.append(f"{target}: no file {shown}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {shown}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move depth into docs/ (limit {MAX_README_LINES})"


def _table_first_cells(page: Path) -> list[str]:
    """The first cell of every body row of every table, e.g. '`bench lan`'."""
    cells = []
    for line in _text(page).splitlines():
        if line.startswith("|") and not re.match(r"\|\s*-", line):
            cells.append(line.split("|")[1].strip())
    return cells


def _code_words(cells: list[str]) -> list[str]:
    """The words of each cell's first code span: '`train --method METHOD`' -> ['train', ...]."""
    spans = (re.match(r"`([^`]+)`", cell) for cell in cells)
    return [span.group(1).split() for span in spans if span]


def test_readme_command_table_names_every_command():
    named = {words[0] for words in _code_words(_table_first_cells(README))}
    missing = sorted(set(COMMANDS) - named)
    assert not missing, f"README.md's command table lacks a row for: {missing} (trainers/cli.py COMMANDS)"


def test_readme_bench_table_names_every_benchmark():
    named = {words[1] for words in _code_words(_table_first_cells(README)) if words[0] == "bench" and len(words) > 1}
    missing = sorted(set(BENCHMARKS) - named)
    assert not missing, f"README.md's bench table lacks a row for: {missing} (trainers/bench.py BENCHMARKS)"


def test_readme_has_a_section_for_every_method():
    headings = [line for line in _text(README).splitlines() if line.startswith("### ")]
    missing = sorted(m for m in METHODS if not any(re.search(rf"--method {re.escape(m)}(?![\w-])", h) for h in headings))
    assert not missing, f"README.md has no '### ... train --method NAME' section for: {missing} (trainers/methods METHODS)"


def test_benchmarks_page_has_a_section_for_every_benchmark():
    headings = {line.strip() for line in _text(ROOT / "docs" / "benchmarks.md").splitlines() if line.startswith("## ")}
    missing = sorted(name for name in BENCHMARKS if not any(h.startswith(f"## bench {name}") for h in headings))
    assert not missing, f"docs/benchmarks.md has no '## bench NAME' section for: {missing}"
