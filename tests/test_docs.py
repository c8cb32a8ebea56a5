"""The documentation renders and its links hold: README.rst, CHANGELOG.rst and every docs/**/*.rst page.

Each page is parsed with docutils as GitHub and PyPI render it; any docutils warning or error
(a broken table, an unknown target, a bad indent) fails. Every relative link (``docs/model.rst``,
``model.rst#results-of-the-shipped-model``, ``#section``) must name a file that exists and, with a
fragment, a section or target id that docutils gives that page. Every page under docs/ must be
linked from another page, so none is orphaned. Sphinx-only roles (``:ref:``, ``:doc:``) are errors
here on purpose: the pages are plain reStructuredText.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import docutils.core
import docutils.nodes
import docutils.utils
import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 380  # issue 35: README is for users, about 350 lines at most


def pages() -> list[Path]:
    return [ROOT / "README.rst", ROOT / "CHANGELOG.rst"] + sorted((ROOT / "docs").rglob("*.rst"))


def _all(node, cls):
    find = getattr(node, "findall", None) or node.traverse  # findall: docutils >= 0.18
    return list(find(cls))


def render(path: Path):
    """(doctree, warnings) for one page: every system message at level WARNING or above."""
    stream = io.StringIO()
    settings = {
        "report_level": 2,  # warnings and up are reported ...
        "halt_level": 5,  # ... and collected rather than raised, so one test lists them all
        "warning_stream": stream,
        "file_insertion_enabled": False,
        "raw_enabled": False,
        "input_encoding": "utf-8",
    }
    try:
        doctree = docutils.core.publish_doctree(path.read_text(encoding="utf-8"), source_path=str(path),
                                                settings_overrides=settings)
    except docutils.utils.SystemMessage as exc:  # pragma: no cover - halt_level 5 should not raise
        return None, [str(exc)]
    problems = [line for line in stream.getvalue().splitlines() if line.strip()]
    return doctree, problems


_ids_cache: dict[Path, set] = {}


def ids_of(path: Path) -> set:
    """Every id docutils gives a page's sections and targets (what a ``#fragment`` can name)."""
    path = path.resolve()
    if path not in _ids_cache:
        doctree, _ = render(path)
        _ids_cache[path] = set() if doctree is None else {i for n in _all(doctree, docutils.nodes.Element)
                                                         for i in n.get("ids", [])}
    return _ids_cache[path]


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def relative_links(doctree) -> list[str]:
    """The refuri of every reference that points into the repository (no scheme such as https:)."""
    uris = [ref["refuri"] for ref in _all(doctree, docutils.nodes.reference) if "refuri" in ref]
    return [uri for uri in uris if not _SCHEME.match(uri)]


def link_problems(page: Path, doctree) -> list[str]:
    problems = []
    for uri in relative_links(doctree):
        target, _, fragment = uri.partition("#")
        dest = (page.parent / target).resolve() if target else page.resolve()
        if not dest.exists():
            problems.append(f"{uri}: no such file ({dest})")
        elif fragment:
            if dest.suffix != ".rst":
                problems.append(f"{uri}: a #fragment into a file that is not a page")
            elif fragment not in ids_of(dest):
                problems.append(f"{uri}: {dest.name} has no section or target '{fragment}'")
    return problems


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_pages_are_there():
    names = {_name(p) for p in pages()}
    for name in ("README.rst", "CHANGELOG.rst", "docs/model.rst", "docs/training.rst", "docs/benchmarks.rst",
                 "docs/development.rst", "docs/commands.rst", "docs/experiments/index.rst"):
        assert name in names, f"{name} is missing"


@pytest.mark.parametrize("page", pages(), ids=_name)
def test_page_renders_without_warnings(page):
    doctree, problems = render(page)
    assert doctree is not None and not problems, f"{_name(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=_name)
def test_page_links_resolve(page):
    doctree, _ = render(page)
    problems = link_problems(page, doctree)
    assert not problems, f"{_name(page)}:\n" + "\n".join(problems)


def test_no_docs_page_is_orphaned():
    linked = set()
    for page in pages():
        doctree, _ = render(page)
        for uri in relative_links(doctree):
            target = uri.partition("#")[0]
            if target:
                linked.add((page.parent / target).resolve())
    orphans = [_name(p) for p in pages() if p.parent != ROOT and p.resolve() not in linked]
    assert not orphans, f"pages no other page links to: {orphans}"


def test_experiment_pages_are_dated():
    for page in (ROOT / "docs" / "experiments").glob("*.rst"):
        if page.name != "index.rst":
            assert re.match(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.rst$", page.name), f"{page.name}: name it YYYY-MM-DD-topic.rst"


def test_readme_is_for_users():
    lines = (ROOT / "README.rst").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.rst has {lines} lines; move reference material to docs/"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A broken page, a missing file, a missing section and a Sphinx role are all reported."""
    (tmp_path / "other.rst").write_text("Other\n=====\n\nA section\n---------\n\ntext\n", encoding="utf-8")
    page = tmp_path / "page.rst"
    page.write_text(
        "Title\n=====\n\n"
        "`ok <other.rst#a-section>`__, `no file <gone.rst>`__, `no section <other.rst#nowhere>`__,\n"
        "`no anchor <#nowhere>`__ and `web <https://beets.io>`__.\n\n"
        "See :ref:`sphinx-only` and `Unknown target`_.\n\n"
        "===== =====\nbroken\n===== =====\n",
        encoding="utf-8",
    )
    doctree, problems = render(page)
    text = "\n".join(problems)
    assert 'Unknown interpreted text role "ref"' in text
    assert 'Unknown target name: "unknown target"' in text
    assert "Malformed table" in text
    links = link_problems(page, doctree)
    assert len(links) == 3, links
    assert any("gone.rst: no such file" in p for p in links)
    assert any("has no section or target 'nowhere'" in p and "other.rst" in p for p in links)
    assert any(p.startswith("#nowhere") for p in links)
