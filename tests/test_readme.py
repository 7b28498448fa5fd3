"""README.md against the code: its runnable examples run, and its signature blocks are the functions' signatures.

A README that drifts from the code is the first thing a new user meets; these tests make the drift a failure."""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import os
import re

import pytest

import mla_kernels

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, text) of every ```python block of the README."""
    blocks, current, start = [], None, 0
    with open(README, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if current is None and line.strip() == "```python":
                current, start = [], number + 1
            elif current is not None and line.strip() == "```":
                blocks.append((start, "".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    return blocks


RUNNABLE = [(line, text) for line, text in python_blocks() if text.startswith("import torch")]
SIGNATURES = [(line, text) for line, text in python_blocks() if "*," in text]


def test_the_readme_has_examples_and_signatures():
    assert len(RUNNABLE) >= 2 and len(SIGNATURES) >= 3, "the README's blocks were not found"


@pytest.mark.parametrize("line,text", RUNNABLE, ids=[f"README.md:{line}" for line, _ in RUNNABLE])
def test_readme_example_runs(line, text):
    """Each example runs as printed (on a GPU when there is one, else on the CPU) and its own checks pass."""
    if "transformers" in text:
        pytest.importorskip("transformers")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(text, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    assert printed.getvalue(), "an example prints what it shows"


def _documented(text: str):
    """(name, ast.arguments) of each ``mla_kernels.f(...)`` / ``f(...)`` written as a signature in ``text``."""
    for match in re.finditer(r"(?:^|=\s*)([\w.]+)\(([^()]*)\)", text, re.MULTILINE | re.DOTALL):
        name, args = match.groups()
        if "*," not in args:
            continue
        tree = ast.parse(f"def f({args}):\n    pass")
        yield name, tree.body[0].args


def _function(name: str):
    obj = mla_kernels if name.startswith("mla_kernels.") else None
    if obj is None:
        from mla_kernels.integrations import flash_mla
        obj = flash_mla
    for part in name.split(".")[1:] if name.startswith("mla_kernels.") else [name]:
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("line,text", SIGNATURES, ids=[f"README.md:{line}" for line, _ in SIGNATURES])
def test_readme_signatures_are_the_functions_signatures(line, text):
    """Every parameter, in order, of the same kind (positional or keyword-only) and with the same default."""
    found = list(_documented(text))
    assert found, f"no signature in the block at README.md:{line}"
    for name, args in found:
        params = list(inspect.signature(_function(name)).parameters.values())
        positional = args.posonlyargs + args.args
        defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
        doc = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, d) for a, d in zip(positional, defaults)]
        doc += [(a.arg, inspect.Parameter.KEYWORD_ONLY, d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
        real = [(p.name, p.kind, p.default) for p in params]
        assert [(n, k) for n, k, _ in doc] == [(n, k) for n, k, _ in real], \
            f"README.md:{line} documents {name}({', '.join(n for n, _, _ in doc)}), the code has " \
            f"({', '.join(n for n, _, _ in real)})"
        for (pname, _, d), (_, _, default) in zip(doc, real):
            documented = inspect.Parameter.empty if d is None else ast.literal_eval(d)
            assert documented == default, f"README.md:{line}: {name}'s {pname} defaults to {default!r}, " \
                                          f"documented as {documented!r}"
