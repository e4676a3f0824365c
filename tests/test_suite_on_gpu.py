"""The suite's own set-up is fit for a GPU machine (``benchmarks/gpu_tests.sh``).

A test module that switches on Triton's CPU interpreter (``TRITON_INTERPRET=1``) at import time
without asking whether CUDA is present turns it on for every test collected with it: on a GPU
every Triton kernel then runs through the interpreter on device tensors and fails ("Cannot call
@triton.jit'd outside of the scope of a kernel"), which is how session 16's
``test_kernels_vision_rope.py`` failed the GPU tests of every file collected beside it.
"""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _unguarded_interpreter_switches(tree: ast.Module) -> list:
    """Line numbers of module-level statements that set TRITON_INTERPRET outside an
    ``if not torch.cuda.is_available():`` block."""
    found = []

    def walk(stmts, guarded):
        for st in stmts:
            if isinstance(st, ast.If):
                cond = ast.unparse(st.test).replace(" ", "")
                walk(st.body, guarded or cond == "nottorch.cuda.is_available()")
                walk(st.orelse, guarded)
            elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                continue  # a docstring
            elif not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if "TRITON_INTERPRET" in ast.unparse(st) and not guarded:
                    found.append(st.lineno)

    walk(tree.body, False)
    return found


def test_no_test_module_turns_the_interpreter_on_where_cuda_is():
    bad = {p.name: lines for p in sorted(TESTS.glob("*.py"))
           if (lines := _unguarded_interpreter_switches(ast.parse(p.read_text(), str(p))))}
    assert not bad, f"set TRITON_INTERPRET only under `if not torch.cuda.is_available():` (module: lines) {bad}"


def test_the_check_sees_both_forms():
    unguarded = ast.parse('"""sets TRITON_INTERPRET"""\nimport os\nos.environ.setdefault("TRITON_INTERPRET", "1")\n')
    guarded = ast.parse('import os, torch\nif not torch.cuda.is_available():\n'
                        '    os.environ.setdefault("TRITON_INTERPRET", "1")\n')
    inside_test = ast.parse('def test_x(monkeypatch):\n    monkeypatch.setenv("TRITON_INTERPRET", "1")\n')
    assert _unguarded_interpreter_switches(unguarded) == [3]
    assert _unguarded_interpreter_switches(guarded) == [] == _unguarded_interpreter_switches(inside_test)
