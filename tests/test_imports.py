"""The import structure: the plain-torch model loads and runs where Triton is absent, and no
module of megatron_lite/ (kernels included) imports itself back through others."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_lite",)

# Triton is a Linux-only dependency. A None entry in sys.modules makes `import triton` raise
# ImportError and importlib.util.find_spec("triton") return None, as when it is not installed.
WITHOUT_TRITON = """\
import sys
sys.modules["triton"] = None
import torch
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.model.ops import TORCH_OPS
from helpers.tiny import tiny_model
for family, fused in (("llama", False), ("gpt2", False), ("llama", True)):
    config = tiny_model(family, fused_kernels=fused)
    model = GPTModel(config)
    assert model.ops is TORCH_OPS, (family, fused)  # without Triton, fused_kernels falls back
    init_weights(model, config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length))
    model(tokens, tokens).mean().backward()
kernel_modules = sorted(m for m in sys.modules
                        if m.startswith("megatron_lite.kernels.") and m != "megatron_lite.kernels.reference")
assert not kernel_modules, kernel_modules
"""


def test_model_imports_and_runs_without_triton() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "MEGATRON_LITE_TRITON": "1"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of PACKAGES (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> set[str]:
    """Every name an import statement of the file may load: `import a.b` gives a.b, and
    `from a import b` gives a and a.b (b may be a submodule). Imports inside functions count,
    as they run sooner or later, and so do those under `if TYPE_CHECKING:`: a circle of type
    imports is still a knot a reader has to untie."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package a.b is a.b.x
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return []


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target in _imported_names(name, path) if target in modules and target != name}
            for name, path in modules.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 40, sorted(graph)  # the walk found the packages
    assert "megatron_lite.model.fused_ops" in graph["megatron_lite.model.ops"]  # an import in a function
    cycle = _find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_find_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


# The floors of the library, lowest first (docs/architecture.md draws them): a module imports
# only from its own package or from a lower floor, so each floor can be read, tested and
# replaced without the ones above it.
FLOORS = (
    ("config", "kernels"),  # what a run is; the fused ops (plain torch references beside them)
    ("ground floor",),  # the package's own modules: the rank grid, every collective, where parameters live
    ("tensor_parallel", "context_parallel", "optimizer", "data"),  # building blocks
    ("model", "distributed"),  # the model over tp and cp; data parallelism and ZeRO
    ("pipeline_parallel", "checkpointing", "hf"),  # stages and schedules; state on disk, ours and Hugging Face's
    ("planner", "inference"),  # what a layout costs; generation
    ("training",),  # flags, the loop, its report
)
FLOOR = {unit: floor for floor, units in enumerate(FLOORS) for unit in units}


def _unit(module: str) -> str:
    """The package of megatron_lite a module belongs to; the modules at its root are the ground floor."""
    parts = module.split(".")
    return "" if len(parts) == 1 else parts[1] if (ROOT / "megatron_lite" / parts[1]).is_dir() else "ground floor"


def test_every_import_goes_down_a_floor() -> None:
    graph = _graph()
    units = {_unit(module) for module in graph} - {""}
    assert units == set(FLOOR), f"packages without a floor: {units - set(FLOOR)}; floors without a package: " \
                                f"{set(FLOOR) - units}"
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if _unit(module) and _unit(target) and _unit(module) != _unit(target)
                    and FLOOR[_unit(target)] >= FLOOR[_unit(module)])
    assert not upward, "imports that do not go down a floor:\n" + "\n".join(upward)


def test_few_top_level_modules() -> None:
    """The root of the package holds the ground floor only; everything else lives in a package per concern."""
    modules = sorted(path.name for path in (ROOT / "megatron_lite").glob("*.py"))
    assert len(modules) <= 6, modules
