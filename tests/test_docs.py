"""The documentation holds together: every relative link and ``#anchor`` in README.md,
CONTRIBUTING.md and docs/ resolves, every option of every command is documented somewhere, and
the README stays a short front page that still carries its two set-up commands verbatim.

Anchors follow GitHub's heading slugs: lowercase, each space a '-', punctuation other than '-'
and '_' dropped, and a repeated heading suffixed -1, -2, ... External links are not fetched.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
SETUP_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/qwenlm chat --pull",
    "bash scripts/test.sh",
)
DOC_PAGES = (
    "inference.md",
    "serving.md",
    "training.md",
    "evaluation.md",
    "models.md",
    "parallel.md",
    "benchmarks.md",
    "architecture.md",
)

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional <...> around the target and a "title".
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?")
_HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)=["']([^"']+)["']""", re.I)
_HTML_ANCHOR = re.compile(r"""<a\b[^>]*?\b(?:name|id)=["']([^"']+)["']""", re.I)
_HELP_OPTION = re.compile(r"^  (-\S.*?)(?: {2,}|$)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto: ...


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading with this markdown text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = (c for c in text if c.isalnum() or c in "-_ " or unicodedata.category(c).startswith("M"))
    return "".join(kept).replace(" ", "-")


def _outside_fences(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out = []
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        out.append((number, line))
    return out


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file offers: heading slugs (numbered when repeated) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _outside_fences(path):
        m = _HEADING.match(line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
        found.update(_HTML_ANCHOR.findall(line))
    return found


def link_targets(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in prose (code is not read)."""
    out = []
    for number, line in _outside_fences(path):
        line = _CODE_SPAN.sub("", line)
        for pattern in (_LINK, _REF_DEF, _HTML_LINK):
            out += [(number, target) for target in pattern.findall(line)]
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link or anchor in ``path`` that leads nowhere."""
    problems = []
    for number, target in link_targets(path):
        if not target or _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading gives #{anchor} in {dest.name}")
    return problems


def doc_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", root / "CONTRIBUTING.md"]
    return files + sorted((root / "docs").rglob("*.md"))


# -- the checker itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Fast inference", "fast-inference"),
        ("Evaluation, agents and the sandbox", "evaluation-agents-and-the-sandbox"),
        ("`qwenlm eval`: benchmarks", "qwenlm-eval-benchmarks"),
        ("Sandbox (`qwenlm.sandbox`)", "sandbox-qwenlmsandbox"),
        ("C++ & co", "c--co"),
        ("snake_case-name v2.5", "snake_case-name-v25"),
        ("**Bold** and [a link](x.md)", "bold-and-a-link"),
        ("长上下文 评测", "长上下文-评测"),
    ],
)
def test_slug_follows_github_rules(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_repeated_headings_are_numbered_and_code_blocks_are_not_headings(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Notes\n## Notes\n```bash\n# not a heading\n```\n## Notes\n## Other\n")
    assert anchors(page) == {"notes", "notes-1", "notes-2", "other"}


def test_checker_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Real section\n")
    page = tmp_path / "a.md"
    page.write_text(
        "# Top\n"
        "[ok](docs/b.md) [ok](docs/b.md#real-section) [ok](#top) [ok](docs/)\n"
        '[web](https://example.com/missing.md) ![img](<docs/b.md> "title")\n'
        "[gone](docs/missing.md) [bad anchor](docs/b.md#nope) [bad local](#bottom)\n"
        "`[in code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "a.md:4: docs/missing.md: no such file",
        "a.md:4: docs/b.md#nope: no heading gives #nope in b.md",
        "a.md:4: #bottom: no heading gives #bottom in a.md",
    ]


# -- the documentation ----------------------------------------------------------------------


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_readme_is_a_short_front_page_with_the_setup_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    for command in SETUP_COMMANDS:
        assert command in text
    linked = {Path(t.partition("#")[0]).name for _, t in link_targets(ROOT / "README.md")}
    assert set(DOC_PAGES) <= linked, "the README links every page of docs/"


def test_every_command_option_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    """Each `--option` that `qwenlm COMMAND --help` lists appears in the README or docs/."""
    from qwenlm.cli import COMMANDS, main

    docs = "\n".join(p.read_text(encoding="utf-8") for p in doc_files())
    missing = []
    for name in COMMANDS:
        assert f"qwenlm {name}" in docs, f"command {name} is not documented"
        with contextlib.suppress(SystemExit):  # argparse exits after --help; `train` returns
            main([name, "--help"])
        options = set()
        for line in capsys.readouterr().out.splitlines():
            spec = _HELP_OPTION.match(line)  # "  -v, --verbose   help text": the left column
            if spec:
                options.update(re.findall(r"--[a-z][a-z0-9-]*", spec.group(1)))
        assert "--help" in options, f"no options read from `qwenlm {name} --help`"
        missing += [f"qwenlm {name} {o}" for o in sorted(options - {"--help"}) if o not in docs]
    assert missing == []
