"""The documentation stays honest: a short README, links that resolve, a complete config reference.

Fast and offline: the files are read as text and ``p2pfed/config.py`` is parsed with :mod:`ast`
(importing it is not needed, and must not be: it may bring torch).
"""

from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPERATING = DOCS / "operating.md"
CONFIG = ROOT / "p2pfed" / "config.py"
MAKEFILE = ROOT / "Makefile"

README_MAX_LINES = 250
#: the page that holds the configuration reference, and the heading it starts at
CONFIG_REFERENCE_HEADING = "Configuration reference"

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page's headings give, with GitHub's -1, -2 … for repeated ones."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, title in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = _LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def test_slug_follows_github() -> None:
    assert slug("Configuration reference (`p2pfed.toml`)") == "configuration-reference-p2pfedtoml"
    assert slug("`[privacy]` and `[privacy.<modality>]`") == "privacy-and-privacymodality"
    assert (slug("Heterogeneous noise (noise-aware mixing)")
            == "heterogeneous-noise-noise-aware-mixing")
    assert slug("1. Simulate a federation") == "1-simulate-a-federation"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details to docs/")


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_no_link_leaves_the_repository() -> None:
    for page in markdown_files():
        for target in relative_links(page):
            file_part = target.partition("#")[0]
            if file_part:
                dest = (page.parent / file_part).resolve()
                assert dest.is_relative_to(ROOT), f"{page.name} links outside: {target}"


def config_keys() -> dict[str, list[str]]:
    """Each dataclass of ``p2pfed/config.py`` and ``p2pfed/config_sections.py``, and
    ``[continual]``'s record, with their fields, read from the source."""
    out: dict[str, list[str]] = {}
    for path, only in ((CONFIG, None), (CONFIG.with_name("config_sections.py"), None),
                       (CONFIG.with_name("continual.py"), "ContinualSettings")):
        out |= _dataclass_fields(path, only)
    return out


def _dataclass_fields(path: Path, only: str | None) -> dict[str, list[str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or (only is not None and node.name != only):
            continue
        is_dataclass = any(
            (isinstance(d, ast.Name) and d.id == "dataclass")
            or (isinstance(d, ast.Call) and isinstance(d.func, ast.Name)
                and d.func.id == "dataclass")
            or (isinstance(d, ast.Attribute) and d.attr == "dataclass")
            or (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
                and d.func.attr == "dataclass")
            for d in node.decorator_list)
        if not is_dataclass:
            continue
        out[node.name] = [
            stmt.target.id for stmt in node.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            and not (isinstance(stmt.annotation, ast.Subscript)
                     and isinstance(stmt.annotation.value, ast.Name)
                     and stmt.annotation.value.id == "ClassVar")
        ]
    return out


def config_reference() -> str:
    """The configuration reference of docs/operating.md: from its heading to the next one of
    the same level."""
    text = OPERATING.read_text(encoding="utf-8")
    match = re.search(rf"^(#+) {CONFIG_REFERENCE_HEADING}.*$", text, re.MULTILINE)
    assert match, f"docs/operating.md has no '{CONFIG_REFERENCE_HEADING}' heading"
    level = match.group(1)
    rest = text[match.end():]
    end = re.search(rf"^{level} (?!#)", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_config_reference_is_complete() -> None:
    keys = config_keys()
    keys["Config"].remove("explicit")  # (which keys the file gave: no table of the file)
    assert "Config" in keys and len(keys) > 3, "p2pfed/config.py's dataclasses were not found"
    reference = config_reference()
    documented = set(re.findall(r"`\[?([A-Za-z_][A-Za-z0-9_]*)", reference))
    missing = sorted(f"{cls}.{key}" for cls, names in keys.items() for key in names
                     if key not in documented)
    assert not missing, ("docs/operating.md's configuration reference does not name "
                         + ", ".join(missing))
    for section in keys["Config"]:
        assert re.search(rf"^#+ .*`\[{section}[\].]", reference, re.MULTILINE), (
            f"no heading for the [{section}] section in docs/operating.md")


def makefile_targets() -> set[str]:
    text = MAKEFILE.read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE))


def test_readme_setup_commands_are_makefile_targets() -> None:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Set up\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Set up' section"
    commands = re.findall(r"^make ([A-Za-z0-9_.-]+)", section.group(1), re.MULTILINE)
    assert commands[:2] == ["demo", "test"], commands
    assert set(commands) <= makefile_targets()
    assert {"demo", "test"} <= makefile_targets()


def test_exit_code_table_matches_exitcodes() -> None:
    tree = ast.parse((ROOT / "p2pfed" / "exitcodes.py").read_text(encoding="utf-8"))
    codes = {node.targets[0].id: node.value.value for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
             and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int)}
    assert len(codes) > 5, "p2pfed/exitcodes.py's codes were not found"
    text = OPERATING.read_text(encoding="utf-8")
    start = text.index("\n## Exit codes\n")
    table = text[start: text.index("\n## ", start + 1)]
    documented = {int(n) for n in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == set(codes.values()), (
        f"docs/operating.md's exit codes {sorted(documented)} != exitcodes.py's "
        f"{sorted(codes.values())}")
