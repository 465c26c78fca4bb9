"""The plugin rule, enforced: the machinery is method-blind.

No module of the package outside `opd_bench/methods/` (and outside the suite specs, which are YAML, and these
tests) contains a method's name or one of the values a method's parameters choose between, as a string literal
(docstrings and comments are prose and may name them). The machinery branches on the methods' declarations
(`Data`, `Reads`) instead. Also: the wheel ships every method file and task card.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opd_bench"
# A literal that is a method's vocabulary by coincidence, not a branch on it: (file, literal) -> why.
ALLOWED = {
    ("opd_bench/signals.py", "entropy"): "__all__: the name of the entropy estimator",
    ("opd_bench/logprobs.py", "entropy"): "TRL's ChunkedLogProbFunction names its extra output so",
    ("opd_bench/trainer.py", "entropy"): "the Signals attribute: logged when the method computed it",
}


def _forbidden() -> set[str]:
    from opd_bench.methods.base import PI_SFT, Rollouts, Teacher, get
    from opd_bench.registry import METHODS

    words = set(METHODS.names()) | {r.value for r in Rollouts} | {t.value for t in Teacher} | {PI_SFT}
    for name in METHODS.names():
        for info in get(name).Params.model_fields.values():
            for arg in typing.get_args(info.annotation) or (info.annotation,):
                words |= {v for v in typing.get_args(arg) if isinstance(v, str)}  # Literal[...] choices
            if typing.get_origin(info.annotation) is typing.Literal:
                words |= {v for v in typing.get_args(info.annotation) if isinstance(v, str)}
    return words


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _literals(path: Path):
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def test_the_forbidden_words_are_the_methods_vocabulary():
    words = _forbidden()
    assert {"standard-opd", "tip", "sft-continue", "offline", "inconsistent", "q3", "soft-or", "reverse-kl"} <= words


def test_no_module_outside_the_methods_folder_names_a_method_or_a_parameter_value():
    words = _forbidden()
    named = {w for w in words if "-" in w}  # distinctive enough to find inside longer strings too
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "methods") in path.parents:
            continue
        where = str(path.relative_to(PACKAGE.parent))
        for line, text in _literals(path):
            if (where, text) in ALLOWED:
                continue
            hits = {text} & words or {w for w in named if w in text}
            if hits:
                found.append(f"{where}:{line}: {sorted(hits)} in {text!r}")
    assert not found, "method names / parameter values outside opd_bench/methods/:\n" + "\n".join(found)


def test_the_rule_would_catch_a_branch_on_a_method_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docstrings may say standard-opd."""\nif method == "tip":\n    pass\n')
    assert [text for _, text in _literals(bad)] == ["tip"]


@pytest.mark.slow
def test_the_wheel_ships_every_method_file_and_task_card(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(PACKAGE.parent)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("opd_bench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("methods", "*.py"), ("tasks", "*.yaml"), ("presets", "*.yaml")):
        expected = {f"opd_bench/{folder}/{p.name}" for p in (PACKAGE / folder).glob(pattern)}
        assert expected and expected <= names, sorted(expected - names)
