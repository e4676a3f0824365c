"""Every repository path named in the docs, docstrings and comments exists (issue 15, item 1).

Folders install under other import names (``hooks/`` is ``vtoken.hooks``), so a path like
``vtoken/hooks/runtime.py`` names no file; paths must be the repository's own. Import names
(``vtoken.hooks.runtime``) are checked elsewhere by importing them.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("vtoken", "scorers", "hooks", "kernels", "demos", "tests", "benchmarks", "docs", ".ci")
PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w])" % "|".join(re.escape(t) for t in TOP))
TEXT = (".py", ".md", ".sh", ".toml", ".txt", ".cfg")


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): walk the tree
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    else:
        files = out.stdout.split()
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its examples name wrong paths on purpose
    return [f for f in files if (f.endswith(TEXT) or f == ".ci/run") and f != this]


#: built-in checkpoint names ("vtoken/tiny-llava") are model ids, like a hub's, not paths (including
#: those named before their folder is installed, e.g. vtoken/tiny-qwen2vl-video until its GPU run)
CHECKPOINT_IDS = {f"vtoken/{p.name}" for p in (ROOT / "vtoken" / "zoo" / "checkpoints").iterdir()}
CHECKPOINT_IDS |= {name for name in __import__("vtoken.zoo", fromlist=["BUILTIN"]).BUILTIN}


def _named_paths(text):
    for m in PATH_RE.finditer(text):
        path = m.group(1).rstrip(".")
        if "*" in path or "{" in path or path in CHECKPOINT_IDS:
            continue
        yield path


def test_named_repository_paths_exist():
    missing = []
    for name in _tracked_text_files():
        text = (ROOT / name).read_text(errors="replace")
        for path in _named_paths(text):
            if not (ROOT / path).exists():
                missing.append(f"{name}: {path}")
    assert not missing, "paths that are not in the repository:\n" + "\n".join(sorted(set(missing)))


def test_design_brief_is_cited_by_its_path():
    bare = []
    for name in _tracked_text_files():
        if name == "docs/DESIGN.md":
            continue
        for i, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if re.search(r"(?<![\w/])DESIGN\.md", line):
                bare.append(f"{name}:{i}")
    assert (ROOT / "docs" / "DESIGN.md").exists()
    assert not bare, "cite docs/DESIGN.md, not DESIGN.md: " + ", ".join(bare)


def test_the_checker_sees_a_wrong_path():
    assert list(_named_paths("see `vtoken/hooks/runtime.py` and hooks/runtime.py.")) == [
        "vtoken/hooks/runtime.py", "hooks/runtime.py"]
    assert not (ROOT / "vtoken/hooks/runtime.py").exists()
