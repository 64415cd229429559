"""The documentation names only what exists: repository paths, `fedrad.*` modules, pages and
anchors. README.md is the front page and links into docs/; `make docs` builds docs/ with MkDocs
in strict mode, and these checks catch the same breakage (and paths and modules, which MkDocs
cannot see) in the fast suite, without MkDocs.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# a word starting with one of these names a file or folder of this repository
REPO_PREFIXES = ("common/", "client/", "server/", "simulations/", "tests/", "docs/", ".ci/")
ROOT_FILES = frozenset(
    {"Makefile", "pyproject.toml", "constraints.txt", "mkdocs.yml", ".pre-commit-config.yaml"}
)
PLACEHOLDER = re.compile(r"[<>*{}|]|\.\.\.|NNN")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(r"\bfedrad(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def path_words(text: str) -> list[str]:
    """Words that name a repository path: in inline code anywhere, and in fenced blocks."""
    chunks = [m.group(1) for m in CODE_SPAN.finditer(prose(text))] + fenced_blocks(text)
    words = []
    for chunk in chunks:
        for raw in chunk.split():
            word = raw.strip("([\"'").rstrip(",.;:)]\"'")
            word = word.split("::")[0].split(":")[0] if not word.endswith(":") else word
            if PLACEHOLDER.search(word):
                continue
            if word.startswith(REPO_PREFIXES) or word in ROOT_FILES:
                words.append(word)
    return words


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    return sorted({w for w in path_words(text) if not (root / w).exists()})


def module_file(dotted: str, root: Path = ROOT) -> Path | None:
    """The source of a `fedrad.x.y` module or package in the tree, if there is one."""
    parts = dotted.split(".")[1:]
    if not parts:
        return None
    path = root.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def top_level_names(source: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def resolves(dotted: str, root: Path = ROOT) -> bool:
    """A module or package, or a name defined at the top of one (`module.function`)."""
    if module_file(dotted, root) is not None:
        return True
    parent, _, name = dotted.rpartition(".")
    source = module_file(parent, root)
    return source is not None and name in top_level_names(source)


def missing_modules(text: str, root: Path = ROOT) -> list[str]:
    return sorted({m for m in MODULE.findall(text) if not resolves(m, root)})


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (MkDocs' default) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for m in HEADING.finditer(prose(page.read_text())):
        base = slug(m.group(2))
        name, n = base, 0
        while name in found:  # toc numbers repeated headings
            n += 1
            name = f"{base}_{n}"
        found.add(name)
    return found


def broken_links(text: str, base: Path) -> list[str]:
    """Relative links from a page in `base` whose file or anchor does not exist."""
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        page = (base / file_part).resolve() if file_part else None
        if page is not None and not page.exists():
            problems.append(f"{target}: no such file")
        elif anchor and page is not None and page.suffix == ".md" and anchor not in anchors(page):
            problems.append(f"{target}: no such anchor")
    return problems


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_every_repository_path_named_exists(page: Path) -> None:
    assert missing_paths(page.read_text()) == []


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_every_fedrad_module_named_exists(page: Path) -> None:
    assert missing_modules(page.read_text()) == []


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page.read_text(), page.parent) == []


def missing_in_module_map(text: str, root: Path = ROOT) -> list[str]:
    """Bare module names in a module-map row, looked up in the row's own folders: in
    "| `common/model/` | `config.py` (...) |", `config.py` must be `common/model/config.py`."""
    problems = []
    for row in re.findall(r"^\|(.+)\|\s*$", prose(text), re.MULTILINE):
        cells = row.split("|")
        folders = [w for w in CODE_SPAN.findall(cells[0]) if w.endswith("/")]
        if not folders:
            continue
        names = [n for cell in cells[1:] for n in CODE_SPAN.findall(cell)]
        for name in names:
            bare = re.fullmatch(r"[\w/]+\.py", name) and not name.startswith(REPO_PREFIXES)
            if bare and not any((root / folder / name).is_file() for folder in folders):
                problems.append(f"{folders[0]}{name}")
    return sorted(problems)


def test_the_module_map_names_files_that_exist() -> None:
    assert missing_in_module_map((DOCS / "architecture.md").read_text()) == []


def test_the_readme_is_a_front_page_into_docs() -> None:
    text = README.read_text()
    linked = {t.partition("#")[0] for t in LINK.findall(prose(text))}
    for page in ("docs/index.md", "docs/architecture.md", "docs/results/index.md"):
        assert page in linked, f"README.md does not link {page}"
    lines = len(text.splitlines())
    assert lines <= 200, f"README.md has {lines} lines: move detail into docs/"


def test_every_docs_page_is_in_the_nav() -> None:
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    pages_on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages_on_disk - nav == set(), "pages MkDocs would warn about (strict: fails)"
    assert nav - pages_on_disk == set(), "nav entries with no page"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """Each check reports a made-up name, and accepts a real one."""
    text = (
        "See `client/site/policy.py` and `client/site/no_such_policy.py`; the folder\n"
        "`common/no_such_package/`; `fedrad.common.privacy.ledger` and\n"
        "`fedrad.common.privacy.no_such_module`, `fedrad.common.findings.NO_SUCH_NAME`.\n"
        "```sh\n.venv/bin/python -m pytest tests/no_such_test.py\n```\n"
    )
    assert missing_paths(text) == [
        "client/site/no_such_policy.py",
        "common/no_such_package/",
        "tests/no_such_test.py",
    ]
    assert missing_modules(text) == [
        "fedrad.common.findings.NO_SUCH_NAME",
        "fedrad.common.privacy.no_such_module",
    ]
    row = "| `common/privacy/` | `ledger.py` (real), `no_such_ledger.py` (made up) |\n"
    assert missing_in_module_map(row) == ["common/privacy/no_such_ledger.py"]
    (tmp_path / "page.md").write_text("# A page\n\n## The `small` preset: real\n")
    links = "[a](page.md) [b](page.md#the-small-preset-real) [c](page.md#nope) [d](gone.md)"
    assert broken_links(links, tmp_path) == [
        "page.md#nope: no such anchor",
        "gone.md: no such file",
    ]


def test_slugs_match_python_markdown() -> None:
    assert slug("What SecAgg+ costs") == "what-secagg-costs"
    assert slug("`small`: a real pretrained LLM") == "small-a-real-pretrained-llm"
    assert slug("The site's GPU") == "the-sites-gpu"
