"""The package's layering (docs/architecture.md): no module imports from a layer listed after its own."""

import ast
from pathlib import Path

import paretoalign

# Lowest first; a module may import from its own layer and the ones before it.
LAYERS = [
    {"files", "preference", "data", "refusal"},
    {"backbone"},
    {"pblora", "blocks", "heads", "model", "static_step"},
    {"features", "candidates", "batches", "losses"},
    {"objective", "teachers", "loop", "train", "export"},
    {"scorers"},
    {"generation", "methods", "baselines"},
    {"evaluation"},
    {"serving", "ui", "onpolicy", "cli", "__main__", "testing"},
]
LAYER = {name: number for number, names in enumerate(LAYERS) for name in names}


def relative_imports(path: Path, root: Path):
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]  # the package the module's relative imports start from
    if parts[-1] == "__init__":
        parts = parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            yield parts, base + (node.module.split(".") if node.module else [])


def test_every_module_has_a_layer_and_imports_none_above_it():
    root = Path(paretoalign.__file__).parent
    modules = {path.relative_to(root).parts[0].removesuffix(".py") for path in root.glob("*") if path.suffix == ".py" or path.is_dir()}
    modules -= {"__init__", "__pycache__"}
    assert modules <= set(LAYER), f"modules without a layer in docs/architecture.md: {sorted(modules - set(LAYER))}"
    upward = []
    for path in sorted(root.rglob("*.py")):
        for importer, target in relative_imports(path, root):
            here, there = importer[0] if importer else "__init__", target[0] if target else "__init__"
            if here != there and LAYER.get(there, -1) > LAYER.get(here, len(LAYERS)):
                upward.append(f"{'.'.join(importer)} imports {'.'.join(target)}")
    assert not upward, upward
