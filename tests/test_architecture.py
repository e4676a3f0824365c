"""The dependency direction of docs/ARCHITECTURE.md, read from the sources (every import statement,
function-level ones included), so the house stays as drawn.

Layers, bottom up (a module may import its own layer's modules and the layers below it only):

    kernels            vtoken.kernels.*                      (torch, triton)
    contract           vtoken.errors, vtoken.signals
    registry           vtoken.plan, vtoken.methods
    scorers, adapters  vtoken.scorers.*, vtoken.adapters.*   (not each other)
    hooks              vtoken.hooks.*
    engine             vtoken.engine.*                       (hooks only through ``vtoken.hooks``)
    tools              vtoken.eval, .bench, .zoo, .data, .demos, .lmms, .vllm, vtoken.cli, vtoken.demo, vtoken

The registry's one upward edge is declared: ``vtoken.methods`` imports the built-in scorer modules
lazily so that they register (as a plugin registry loads its entry points).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: repository folder -> import name of its package (pyproject.toml's package-dir)
FOLDERS = {"vtoken": "vtoken", "scorers": "vtoken.scorers", "hooks": "vtoken.hooks",
           "kernels": "vtoken.kernels", "demos": "vtoken.demos"}

LAYERS = [
    ("kernels", ("vtoken.kernels",)),
    ("contract", ("vtoken.errors", "vtoken.signals")),
    ("registry", ("vtoken.plan", "vtoken.methods")),
    ("scorers", ("vtoken.scorers",)),
    ("adapters", ("vtoken.adapters",)),
    ("hooks", ("vtoken.hooks",)),
    ("engine", ("vtoken.engine",)),
    ("tools", ("vtoken.eval", "vtoken.bench", "vtoken.zoo", "vtoken.data", "vtoken.demos", "vtoken.lmms", "vtoken.vllm",
               "vtoken.cli", "vtoken.demo", "vtoken.__init__", "vtoken.__main__", "vtoken._folder_guard")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
#: what each layer may import besides its own layer (by layer name)
ALLOWED = {
    "kernels": set(),
    "contract": set(),
    "registry": {"contract"},
    "scorers": {"kernels", "contract", "registry"},
    "adapters": {"contract", "registry"},
    "hooks": {"kernels", "contract", "registry", "scorers", "adapters"},
    "engine": {"kernels", "contract", "registry", "adapters", "hooks"},
    "tools": {name for name, _ in LAYERS},
}
#: declared exceptions: (importer, imported prefix)
DECLARED = {("vtoken.methods", "vtoken.scorers")}


def layer_of(module: str):
    best = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > len(best[1]):
                    best = (name, p)
    if best is None and module == "vtoken":
        return "tools"
    return best[0] if best else None


def iter_modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts]
            if folder == "vtoken" and parts and parts[0] in ("scorers", "hooks", "kernels", "demos"):
                continue
            name = ".".join([package] + parts)
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")] if name != "vtoken.__init__" else "vtoken.__init__"
            yield name, path


def imports_of(name: str, path: Path) -> dict:
    """{imported vtoken module: names taken from it (empty for a plain ``import``)}."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if name == "vtoken.__init__":
        package = "vtoken"
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name, set())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.setdefault(mod, set()).update(a.name for a in node.names)
    return {m: n for m, n in out.items() if m == "vtoken" or m.startswith("vtoken.")}


def _hooks_public_names() -> set:
    """The names the package ``vtoken.hooks`` exports (its ``__all__``): the engines' surface."""
    tree = ast.parse((ROOT / "hooks" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}
    return set()


def violations(modules) -> list:
    bad, public = [], _hooks_public_names()
    for name, path in modules:
        src = layer_of(name)
        if src is None:
            bad.append(f"{name}: in no layer of docs/ARCHITECTURE.md")
            continue
        for target, names in sorted(imports_of(name, path).items()):
            dst = layer_of(target)
            if dst is None or dst == src:
                continue
            if dst not in ALLOWED[src] and not any(name == a and target.startswith(b) for a, b in DECLARED):
                bad.append(f"{name} ({src}) imports {target} ({dst})")
            elif src == "engine" and dst == "hooks" and (target != "vtoken.hooks" or not names <= public):
                # the engine uses the handle's public surface: the names the package vtoken.hooks exports
                bad.append(f"{name} (engine) imports the hooks' internals {target} {sorted(names)}; "
                           f"use `from vtoken.hooks import ...` ({', '.join(sorted(public))})")
    return bad


def test_every_import_follows_the_layers():
    modules = list(iter_modules())
    assert len(modules) > 60
    bad = violations(modules)
    assert not bad, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_the_checker_sees_a_wrong_edge(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from vtoken.hooks.runtime import Runtime\n")
    assert violations([("vtoken.scorers.x", f)]) == [
        "vtoken.scorers.x (scorers) imports vtoken.hooks.runtime (hooks)"]
    f.write_text("from vtoken.hooks.handle import HANDLE_ATTR\n")
    assert any("internals" in v for v in violations([("vtoken.engine.x", f)]))
    f.write_text("from vtoken.hooks import handle_of\n")
    assert violations([("vtoken.engine.x", f)]) == []


def test_architecture_doc_names_every_layer():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for _, prefixes in LAYERS:
        for p in prefixes:
            if p.startswith("vtoken.__") or p == "vtoken._folder_guard":
                continue
            assert f"`{p}" in doc, p


@pytest.mark.parametrize("folder", [
    "hooks", "scorers", "kernels", "vtoken", "vtoken/engine", "vtoken/adapters", "vtoken/eval", "vtoken/bench",
    "vtoken/data", "demos", "vtoken/zoo", "vtoken/lmms", "vtoken/vllm"])
def test_modules_stay_small(folder):
    """No module over ~400 lines unless its docstring gives the reason ("Size:" paragraph)."""
    big = []
    for path in sorted((ROOT / folder).glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Size:" not in doc:
                big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines, no 'Size:' reason in its docstring")
    assert not big, "\n".join(big)


def test_add_a_method_recipe_works_as_written(tmp_path, monkeypatch):
    """docs/ARCHITECTURE.md's "Add a method" block, saved as one file and imported, is a working
    method: apply_pruning(method="norm") keeps, per image, the tokens with the largest norm of the
    hidden state entering layer K (checked against that layer's input read by a plain hook)."""
    import importlib.util
    import re
    import sys

    import torch

    import vtoken
    from vtoken import methods
    from conftest import get_inputs, get_model

    methods.available_methods()
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    monkeypatch.setattr(methods, "_SCORERS", dict(methods._SCORERS))
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"\*\*Add a method\*\*.*?```python\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "my_norm_method.py").write_text(block)
    spec = importlib.util.spec_from_file_location("my_norm_method", tmp_path / "my_norm_method.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_norm_method", module)
    spec.loader.exec_module(module)
    assert "norm" in vtoken.available_methods()

    model = get_model("llava")
    inputs = get_inputs("llava", model, variant="single")
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach())

    hook = model.model.language_model.layers[2].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)  # plain: the hidden states entering layer 2, every token in place
    finally:
        hook.remove()
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    expected = seen["h"][0, image].float().norm(dim=-1).topk(5).indices.sort().values
    with vtoken.apply_pruning(model, method="norm", keep=5) as handle:
        with torch.no_grad():
            model(**inputs)
        kept = handle.stats.stages[0].kept[0]
    assert handle.method == "norm"
    assert kept.tolist() == expected.tolist()
