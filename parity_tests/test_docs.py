"""The README as a front door, and the links of every page.

README.md stays short (at most 250 lines), names the two set-up commands and links every docs
page that holds what used to be its sections; every relative link in README.md and in
docs/**/*.md points at a file or folder that exists, and every ``#anchor`` (same-page ones too)
names a heading of the target Markdown file, by GitHub's slug rules. Pure file reading: no
framework is imported, no http(s) link is fetched.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250
SETUP_COMMANDS = ("make report", "make test")
#: The pages that hold the README's former sections (each must be linked from the README).
MOVED_TO = (
    "docs/setup.md",                # set-up: why a Makefile, the two environments
    "docs/network.md",              # the network, memory-efficient mode, the layout
    "docs/report.md",               # the parity report
    "docs/check.md",                # check your own DenseNet (Keras included)
    "docs/weights.md",              # weights across frameworks
    "docs/onnx.md",                 # ONNX: export, proven, and check
    "docs/suite.md",                # the parity suite and its budget
    "docs/exercises.md",            # the chapter's exercises
    "docs/training.md",             # training
    "docs/performance/README.md",   # performance
    "docs/gpu/README.md",           # GPU runs and what is still open
)
#: Sections the README links by anchor (the suite's budget is kept one click away).
README_ANCHORS = ("docs/suite.md#the-suites-budget",
                  "docs/gpu/README.md#gpu-runs-and-what-is-still-open")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_INLINE_LINK = re.compile(r"\]\(\s*<?([^()\s<>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
_HTML_ID = re.compile(r"<[a-z][^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root: Path = ROOT) -> List[Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def _outside_fences(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                    and not line.strip()[len(m.group(1)):].strip():
                fence = None
        else:
            yield number, line


def _without_code(text: str) -> List[Tuple[int, str]]:
    """The lines outside fenced code, inline code spans blanked out (a span may run over the
    lines of one paragraph, never over a blank line); line numbers kept."""
    lines = list(_outside_fences(text))
    out: List[Tuple[int, str]] = []
    block: List[Tuple[int, str]] = []

    def flush():
        if block:
            joined = "\n".join(line for _, line in block)
            joined = _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), joined)
            out.extend(zip((n for n, _ in block), joined.split("\n")))
            block.clear()

    previous = None
    for number, line in lines:
        if not line.strip() or (previous is not None and number != previous + 1):
            flush()
        if line.strip():
            block.append((number, line))
        previous = number
    flush()
    return out


def links(text: str) -> List[Tuple[int, str]]:
    """(line number, target) of every link and image: inline, reference definitions, HTML."""
    found = []
    for number, line in _without_code(text):
        for pattern in (_INLINE_LINK, _REF_DEF, _HTML_LINK):
            found.extend((number, m.group(1)) for m in pattern.finditer(line))
    return sorted(found)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered (links by their text, code without
    backticks, no emphasis marks), lowercased, every character other than a letter, digit,
    space, '-' or '_' removed, each space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                          # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> Set[str]:
    """Every anchor a Markdown page offers: its headings' slugs (a repeated one numbered -1,
    -2, ... as GitHub does) and the ids of HTML elements in it."""
    seen: Dict[str, int] = {}
    result: Set[str] = set()
    lines = list(_outside_fences(text))
    for i, (number, line) in enumerate(lines):
        heading = None
        m = _ATX.match(line)
        if m:
            heading = m.group(2) or ""
        elif (i + 1 < len(lines) and lines[i + 1][0] == number + 1 and line.strip()
              and not line.lstrip().startswith(("|", "-", "*", ">", "#"))
              and re.match(r"^ {0,3}(=+|-+)\s*$", lines[i + 1][1])
              and (i == 0 or lines[i - 1][0] != number - 1 or not lines[i - 1][1].strip())):
            heading = line.strip()            # a setext heading (text over === or ---)
        if heading is not None:
            base = slug(heading)
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    result.update(m.group(1) for m in _HTML_ID.finditer(text))
    return result


def check_links(files: List[Path], root: Path) -> List[str]:
    """Every broken relative link or anchor in ``files``, one line each ('FILE:LINE: ...');
    external links (any scheme: http, https, mailto) are not fetched."""
    problems = []
    cache: Dict[Path, Set[str]] = {}
    for page in files:
        for number, target in links(page.read_text(encoding="utf-8")):
            where = f"{page.relative_to(root)}:{number}: {target!r}"
            if not target or _SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            path = unquote(path)
            if not path:
                dest = page
            elif path.startswith("/"):
                dest = root / path.lstrip("/")
            else:
                dest = page.parent / path
            dest = Path(*_normalise(dest.parts))
            if root not in (dest, *dest.parents):
                problems.append(f"{where}: points outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}: no such file or folder {dest.relative_to(root)}")
                continue
            if not anchor:
                continue
            if dest.is_dir():
                dest = dest / "README.md"      # GitHub shows a folder's README.md
                if not dest.exists():
                    problems.append(f"{where}: an anchor into a folder without a README.md")
                    continue
            if dest.suffix.lower() != ".md":
                continue                         # anchors into code (#L10) are not headings
            if dest not in cache:
                cache[dest] = anchors(dest.read_text(encoding="utf-8"))
            if unquote(anchor).lower() not in cache[dest]:
                problems.append(f"{where}: no heading with the anchor #{anchor} in "
                                f"{dest.relative_to(root)}")
    return problems


def _normalise(parts) -> List[str]:
    out: List[str] = []
    for part in parts:
        if part == "..":
            if len(out) > 1:
                out.pop()
        elif part != ".":
            out.append(part)
    return out


def _readme_targets() -> Set[str]:
    """The README's link targets, as paths from the repository root (anchors kept)."""
    targets = set()
    for _, target in links(README.read_text(encoding="utf-8")):
        if target and not _SCHEME.match(target) and not target.startswith("#"):
            path, sep, anchor = target.partition("#")
            resolved = Path(*_normalise((README.parent / unquote(path)).parts))
            if ROOT not in resolved.parents:
                continue                   # outside the repository: the link test says so
            rel = resolved.relative_to(ROOT).as_posix()
            targets.add(rel)
            if resolved.is_dir():
                targets.add(f"{rel}/README.md")
            if sep:
                targets.add(f"{rel}#{anchor}")
    return targets


# --------------------------------------------------------------------------------- the README

def test_readme_is_at_most_250_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines, more than {MAX_README_LINES}: it is the front door; move "
        "the detail into a page under docs/ and link it")


def test_readme_names_both_setup_commands():
    text = README.read_text(encoding="utf-8")
    for command in SETUP_COMMANDS:
        assert command in text, f"README.md does not name the set-up command {command!r}"


def test_readme_links_every_page_with_moved_content():
    targets = _readme_targets()
    missing = [page for page in MOVED_TO + README_ANCHORS if page not in targets]
    assert not missing, f"README.md does not link: {missing}"
    for page in MOVED_TO:
        assert (ROOT / page).is_file(), page


# ------------------------------------------------------------------------------------ the links

@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    problems = check_links([page], ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


# ------------------------------------------------------------------------- the checker itself

def test_slug_follows_githubs_rules():
    assert slug("The suite's budget") == "the-suites-budget"
    assert slug("ONNX: export, proven, and check") == "onnx-export-proven-and-check"
    assert (slug("House prices: the MLP DenseNet of exercise 5, with the book's Kaggle recipe")
            == "house-prices-the-mlp-densenet-of-exercise-5-with-the-books-kaggle-recipe")
    assert (slug("Training on several devices: `densenet train --devices N [--sync-bn]`")
            == "training-on-several-devices-densenet-train---devices-n---sync-bn")
    assert slug("1. Average or max pooling") == "1-average-or-max-pooling"
    assert slug("The `densenet` command") == "the-densenet-command"
    assert slug("snake_case and [a link](x.md)") == "snake_case-and-a-link"
    assert anchors("# A\n\n## A\n\n```\n# not a heading\n```\n\n## A\n") == {"a", "a-1", "a-2"}


def test_checker_reports_a_planted_broken_link_and_anchor(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## The suite's budget\n\nSee [home](../README.md#intro) and "
        "[self](#the-suites-budget), [up](sub/), [a figure](sub/fig.png).\n")
    (tmp_path / "docs" / "sub" / "fig.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Home\n\n## Intro\n\n"
        "[ok](docs/page.md), [ok anchor](docs/page.md#the-suites-budget),\n"
        "[gone](docs/missing.md) and [bad anchor](docs/page.md#the-suite-budget),\n"
        "[bad here](#nowhere), [out](../elsewhere.md), [web](https://example.com/x.md#y).\n\n"
        "```\n[in code](docs/not-checked.md)\n```\n\nand `[span](docs/not-checked.md)`.\n")
    problems = check_links(markdown_files(tmp_path), tmp_path)
    assert len(problems) == 4, problems
    assert any("README.md:6: 'docs/missing.md'" in p and "no such file" in p for p in problems)
    assert any("README.md:6: 'docs/page.md#the-suite-budget'" in p
               and "no heading with the anchor #the-suite-budget" in p for p in problems)
    assert any("README.md:7: '#nowhere'" in p and "no heading" in p for p in problems)
    assert any("'../elsewhere.md'" in p and "outside the repository" in p for p in problems)
    # and fixing them leaves nothing to report
    (tmp_path / "README.md").write_text(
        "# Home\n\n## Intro\n\n[ok](docs/page.md#the-suites-budget)\n")
    assert check_links(markdown_files(tmp_path), tmp_path) == []
