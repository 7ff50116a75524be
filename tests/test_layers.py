"""Each stage imports only the stages below it: the package layout is the pipeline.

``dq`` (errors, cache, data, calibration, models, atomic writes) < ``quant`` (GGML types, libggml, GGUF
container, imatrix) < ``kernels`` < ``convert`` (HF -> GGUF) < ``analysis`` < ``plan`` < ``export`` <
``evals`` < ``hub`` < ``cli``. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS = ["dq", "quant", "kernels", "convert", "analysis", "plan", "export", "evals", "hub", "cli"]
ROOT = Path(__file__).resolve().parents[1] / "dq"


def _layer(module: str) -> str:
    if module == "dq.__main__":  # `python -m dq` is the CLI
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "dq"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "dq" or m.startswith("dq.")}


def test_every_import_points_down_the_pipeline():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(("dq", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        here = LAYERS.index(_layer(module))
        for target in _imports(path):
            if LAYERS.index(_layer(target)) > here:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that point up the pipeline:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dq"):
                bad += [f"{path.relative_to(ROOT.parent)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private names used across modules (make them public):\n" + "\n".join(bad)
