"""The documentation site (docs/, mkdocs.yml) builds, and its Python snippets run.

Every ```python block of a page runs, in order, in one namespace per page (the convention of
tests/test_examples.py::test_readme_python_blocks_run for the README); a block that must not
run is fenced ```py instead. The site itself is built with ``mkdocs build --strict``, which
fails on a broken link or anchor, a page missing from the nav and a docstring warning.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import metaopt

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
# the shipped families: the API page documents each (as ``plugins.<module>.<Class>``: griffe reads
# the source tree, where metaopt.plugins is the directory plugins/)
FAMILIES = ("plugins.mada.MADA", "plugins.hd.SGDHD", "plugins.hd.AdamHD", "plugins.padam.Padam")


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in nav order (paths relative to docs/)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def walk(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            if isinstance(value, list):
                yield from walk(value)
            else:
                yield value

    return list(walk(config["nav"]))


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```python block of a page."""
    text = (DOCS / page).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_every_page_is_in_the_nav():
    pages = nav_pages()
    assert len(pages) == len(set(pages)), "a page appears twice in the nav"
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(pages) == on_disk


def test_api_page_documents_every_public_name():
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: (\S+)$", api, flags=re.M))
    missing = [f"metaopt.{name}" for name in metaopt.__all__ if f"metaopt.{name}" not in documented]
    missing += [name for name in FAMILIES if name not in documented]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"


def test_the_raw_api_page_indexes_what_it_renders():
    """Read raw, the page's `::: name` lines say nothing: its index table names each one."""
    api = (DOCS / "api.md").read_text()
    index = api.split("## The optimizer")[0]
    documented = set(re.findall(r"^::: (\S+)$", api, flags=re.M))
    public = {n.replace("plugins.", "metaopt.plugins.") for n in documented}
    missing = [n for n in sorted(public) if n not in index]
    assert not missing, f"docs/api.md's index table lacks {missing}"


def test_snippets_exist():
    counts = {page: len(python_blocks(page)) for page in nav_pages()}
    assert counts["index.md"] >= 1  # the quickstart
    assert sum(counts.values()) >= 15, counts


@pytest.mark.parametrize("page", nav_pages())
def test_page_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's ```python blocks, in order, in one namespace; a traceback names the page and
    the line in it."""
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes (trainer output) lands in tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    for line, code in python_blocks(page):
        # padded so that line numbers in a traceback are the page's own
        exec(compile("\n" * line + code, str(DOCS / page), "exec"), namespace)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' to build the site")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (site / "api" / "index.html").read_text()
    for name in [f"metaopt.{n}" for n in metaopt.__all__] + list(FAMILIES):
        assert f'id="{name}"' in api, f"{name} was not rendered in the API reference"
    for page in nav_pages():
        built = site / ("index.html" if page == "index.md" else Path(page).with_suffix("") / "index.html")
        assert built.is_file(), f"{page} was not built"
