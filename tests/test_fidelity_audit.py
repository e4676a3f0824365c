"""docs/FIDELITY.md covers every registered method: one audit row per name in
``available_methods()``, naming fidelity tests that exist, and a reference source that agrees with
the method's registration (``MethodSpec.released_code``, the README's last column)."""

import ast
import re
from pathlib import Path

from vtoken.methods import available_methods, method_spec

ROOT = Path(__file__).resolve().parents[1]


def _rows():
    rows = {}
    for line in (ROOT / "docs" / "FIDELITY.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| (.*?) \| (.*?) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def _tests_named(cell):
    """(file, test) pairs of a cell: ``FILE::t1, ::t2; OTHER_FILE::t3`` (a bare ``::t`` is in the
    file named last)."""
    out, current = [], None
    for part in re.split(r"[;,]\s*", cell):
        m = re.match(r"(tests/[\w/]+\.py)?::(\w+)", part.strip())
        if m:
            current = m.group(1) or current
            out.append((current, m.group(2)))
    return out


def test_every_method_has_an_audit_row_with_existing_tests():
    rows = _rows()
    assert sorted(rows) == sorted(available_methods())
    for name, (tests, _) in rows.items():
        named = _tests_named(tests)
        assert named, name
        for file, test in named:
            tree = ast.parse((ROOT / file).read_text())
            defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert test in defined, (name, file, test)


def test_audit_reference_agrees_with_the_registration():
    for name, (_, reference) in _rows().items():
        released = method_spec(name).released_code
        commit = re.search(r"@([0-9a-f]{7})", released)
        if commit:  # a pinned commit in the registration is the one the audit names
            assert commit.group(1) in reference, (name, released, reference)
