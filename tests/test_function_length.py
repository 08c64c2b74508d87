"""No function in spruce/ or bench/ longer than 80 lines, except the training loop and the Triton kernels."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 80
# the training loop reads best as one piece; Triton and Gluon kernels are one GPU program each
EXEMPT = {("spruce/recover/train.py", "train")}


def long_functions(folders=("spruce", "bench"), limit=LIMIT) -> list[str]:
    """`path:line name (N lines)` for every function longer than `limit` lines."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                if (rel, node.name) in EXEMPT or any(_is_triton_jit(d) for d in node.decorator_list):
                    continue
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = node.end_lineno - start + 1 - _kernel_lines(node)
                if length > limit:
                    found.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return found


def _kernel_lines(node) -> int:
    """Lines of the Triton kernels defined inside `node` (a function that builds them on first use)."""
    return sum(k.end_lineno - min([k.lineno, *(d.lineno for d in k.decorator_list)]) + 1
               for k in ast.walk(node) if k is not node and isinstance(k, ast.FunctionDef)
               and any(_is_triton_jit(d) for d in k.decorator_list))


def _is_triton_jit(decorator) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in ("triton.jit", "jit", "triton.autotune", "gluon.jit", "gluon.constexpr_function")


def test_no_function_is_longer_than_80_lines():
    assert long_functions() == []


if __name__ == "__main__":
    print("\n".join(long_functions()) or "none")
