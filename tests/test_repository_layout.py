"""The repository's mapped folders (scorers/ hooks/ kernels/ demos/ -> vtoken.*) never stand in for
another distribution, whatever sys.path holds (issue 15, item 1; ``vtoken/_folder_guard.py``).

Each case runs in a fresh interpreter started at the repository root, so the root is first on
sys.path exactly as under ``python -m pytest`` or a notebook started there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("kernels", "hooks", "scorers", "demos")


def _run(code: str, extra_path=None, timeout=300):
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bare_names_go_to_other_distributions(tmp_path):
    # another "site-packages" after the root: a package `kernels`, a package `scorers`, a package
    # `demos` and a single-file module `hooks.py`, each marked as the other distribution's
    for name in MAPPED:
        if name == "hooks":
            (tmp_path / "hooks.py").write_text("OWNER = 'other'\n")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("OWNER = 'other'\n")
            (tmp_path / name / "sub.py").write_text("VALUE = 7\n")
    out = _run(
        """
        import json, sys
        assert sys.path[0] in ("", %r), sys.path[:3]
        import kernels, hooks, scorers, demos
        from kernels.sub import VALUE
        print(json.dumps({"owners": [m.OWNER for m in (kernels, hooks, scorers, demos)],
                          "files": [m.__file__ for m in (kernels, hooks, scorers, demos)], "sub": VALUE}))
        """ % str(ROOT),
        extra_path=tmp_path,
    )
    assert out["owners"] == ["other"] * 4
    assert all(f.startswith(str(tmp_path)) for f in out["files"]), out["files"]
    assert out["sub"] == 7


def test_bare_names_are_empty_without_another_distribution():
    """No other distribution of the name: the bare import gives what Python gives for a folder that
    is not a package (an empty module, no __file__, no submodules); none of the folder's code runs
    under that name, and the vtoken.* names are the folders."""
    out = _run(
        """
        import importlib, json, sys
        res = {}
        for name in ("hooks", "scorers", "demos"):
            mod = importlib.import_module(name)
            try:
                importlib.import_module(name + ".runtime" if name == "hooks" else name + ".app")
                sub = "imported"
            except ModuleNotFoundError:
                sub = "missing"
            res[name] = [getattr(mod, "__file__", None), sorted(k for k in vars(mod) if not k.startswith("__")), sub]
        res["loaded"] = sorted(m for m in sys.modules if m.startswith("vtoken.hooks") or m.startswith("vtoken.scorers"))
        import vtoken.hooks, vtoken.scorers, vtoken.demos, vtoken.kernels
        res["mapped"] = [vtoken.kernels.__file__, vtoken.scorers.__file__]
        print(json.dumps(res))
        """
    )
    for name in ("hooks", "scorers", "demos"):
        assert out[name] == [None, [], "missing"], out
    assert out["loaded"] == [], out  # the folders' code never ran under the bare names
    assert out["mapped"][0] == str(ROOT / "kernels" / "__init__.py")
    assert out["mapped"][1] == str(ROOT / "scorers" / "__init__.py")


def test_transformers_builds_and_generates_with_root_first_on_sys_path():
    """With the repository root first on sys.path, transformers (which imports Hugging Face's
    ``kernels`` from 5.25 on) builds a tiny LLaVA; pruned generate works and keep-all equals plain."""
    out = _run(
        """
        import json, sys, importlib.util
        sys.path.insert(1, %r)
        import torch, transformers
        from tiny_models import tiny_llava, llava_inputs
        from vtoken import apply_pruning
        hf = importlib.util.find_spec("kernels")
        kernels_file = None
        try:
            import importlib.metadata as md
            md.version("kernels")
            import kernels
            kernels_file = kernels.__file__
        except Exception:
            pass
        model = tiny_llava()
        inputs = llava_inputs(model, [3], [1], [4])
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with apply_pruning(model, method="fastv", keep=1.0):
            same = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with apply_pruning(model, method="fastv", keep=8):
            pruned = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        print(json.dumps({"kernels_file": kernels_file, "equal": torch.equal(plain, same),
                          "pruned_len": pruned.shape[1], "plain_len": plain.shape[1],
                          "transformers": transformers.__version__}))
        """ % str(ROOT / "tests")
    )
    if out["kernels_file"] is not None:  # Hugging Face's kernels is installed (transformers >= 5.25 requires it)
        assert not out["kernels_file"].startswith(str(ROOT)), out
    assert out["equal"]
    assert out["pruned_len"] == out["plain_len"]


@pytest.mark.parametrize("name", MAPPED)
def test_each_mapped_folder_says_what_it_installs_as(name):
    doc = (ROOT / name / "__init__.py").read_text().split('"""')[1]
    assert f"vtoken.{name}" in doc and f"{name}/" in doc
