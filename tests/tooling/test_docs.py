"""The documentation stands on its own: every link and every repository path the README and
docs/ name exists, none cites a file outside the repository, and the README stays a front door."""
import glob
import os
import re

import pytest

from conftest import ROOT

PAGES = ["README.md", "CHANGELOG.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs",
                                                                                                          "*.md")))]
TOP = ("csrc", "fsam_kernels", "benchmarks", "tests", "tools", "docs")


@pytest.mark.parametrize("page", PAGES)
def test_links_and_paths_exist(page):
    text = open(os.path.join(ROOT, page)).read()
    here = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert os.path.exists(os.path.join(here, target)), f"{page}: link to {target}"
    for path in re.findall(rf"`((?:{'|'.join(TOP)})/[^`\s*<>{{}}]+?)[`:]", text):
        path = path.rstrip("/.,")
        assert os.path.exists(os.path.join(ROOT, path)), f"{page}: {path}"
    assert "SPEC" not in text, f"{page} cites a file outside the repository"


def test_the_readme_is_a_front_door():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) < 200
    heads = [x for x in lines if x.startswith("## ")]
    for wanted in ("## Install", "## Quick start", "## Backends", "## Headline results", "## Documentation"):
        assert wanted in heads, wanted
