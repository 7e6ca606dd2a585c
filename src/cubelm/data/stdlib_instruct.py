"""The built-in instruct set: standard-library function docstring → function source.

Every documented function and method in the running interpreter's standard library becomes one example:
instruction ``Write the Python function `name(args)` described below.``, input the cleaned docstring, output the
function's source (decorators included, dedented). Extraction uses ``ast`` only, in sorted file order and source
order, so the set is the same on every run. Files that are not UTF-8 or do not parse are skipped (they are test
fixtures). Used by ``cubelm data prepare --source stdlib-instruct`` and later by fine-tuning and code-generation
evaluation. Try it: ``python -m cubelm.data.stdlib_instruct | head -40``.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from collections.abc import Iterator

from cubelm.data.instruct import InstructExample, format_alpaca, to_document
from cubelm.data.sources import Document, stdlib_files, stdlib_root

MIN_DOCSTRING_CHARS = 20
MAX_DOCSTRING_CHARS = 2_000
MAX_SOURCE_LINES = 80  # long functions make poor prompts and blow past small contexts


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) in source order; functions nested inside functions are skipped."""
    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
    yield from visit(tree, "")


def _source(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    return textwrap.dedent("".join(lines[start:node.end_lineno])).rstrip() + "\n"


def example_from_function(name: str, node: ast.FunctionDef | ast.AsyncFunctionDef,
                          lines: list[str]) -> InstructExample | None:
    doc = ast.get_docstring(node, clean=True)
    if not doc or not MIN_DOCSTRING_CHARS <= len(doc) <= MAX_DOCSTRING_CHARS:
        return None
    if node.end_lineno - node.lineno + 1 > MAX_SOURCE_LINES:
        return None
    prefix = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    signature = f"{prefix}{node.name}({ast.unparse(node.args)})"
    return InstructExample(instruction=f"Write the Python function `{signature}` described below.",
                           input=doc, output=_source(lines, node))


def examples_from_source(text: str) -> Iterator[tuple[str, InstructExample]]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # test fixtures with deliberately bad syntax or null bytes
        return
    lines = text.splitlines(keepends=True)
    for name, node in _functions(tree):
        example = example_from_function(name, node, lines)
        if example is not None:
            yield name, example


def iter_stdlib_examples() -> Iterator[tuple[str, InstructExample]]:
    """(id, example) pairs, id = ``relative/path.py:Class.method``."""
    root = stdlib_root()
    for path in stdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = path.relative_to(root).as_posix()
        for name, example in examples_from_source(text):
            yield f"{rel}:{name}", example


def iter_stdlib_instruct(template: str = "alpaca") -> Iterator[Document]:
    for doc_id, example in iter_stdlib_examples():
        yield to_document(doc_id, example, template)


if __name__ == "__main__":
    for count, (doc_id, example) in enumerate(iter_stdlib_examples()):
        if count < 2:
            print(f"# {doc_id}\n{format_alpaca(example)}{example.output}")
    print(f"{count + 1} examples", file=sys.stderr)
