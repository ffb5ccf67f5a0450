"""The layout: the pipeline's stages import only from earlier stages (data → activations → sae
→ train → eval → analyse → steer → view), and an architecture is one module."""

from __future__ import annotations

import ast
from pathlib import Path

import saelab
from saelab.sae.arch import ArchConfig

SRC = Path(saelab.__file__).parent
STAGE = {
    # the shared ground: errors, files, configs' primitives, reuse markers, devices, process groups
    "errors": 0, "io": 0, "config_base": 0, "device": 0, "parallel": 0, "config": 0, "stage": 0,
    "outputs": 0,
    "data": 1, "lm": 2, "models": 2, "activations": 3, "sae": 4, "train": 5, "eval": 6,
    "analyse": 7, "steer": 8, "view": 9,
    # what runs the pipeline: free to import any stage
    "flags": 10, "demo": 10, "studies": 10, "cli": 10, "__init__": 10, "__main__": 10,
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, saelab module) of every import outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saelab"):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("saelab")]
    return out


def test_no_import_runs_backwards_in_the_pipeline() -> None:
    backwards = []
    for path in SRC.rglob("*.py"):
        here = path.relative_to(SRC).parts[0].removesuffix(".py")
        assert here in STAGE, f"{here}: a new top-level module; give it its stage here"
        for line, module in imports(path):
            there = module.split(".")[1] if "." in module else "__init__"
            if there == here or module == "saelab":  # the package itself: __version__
                continue
            if STAGE[there] > STAGE[here]:
                backwards.append(f"{path.relative_to(SRC)}:{line} ({here}) imports {module} ({there})")
    assert not backwards, "\n".join(backwards)


def test_every_architecture_is_one_module_with_its_config() -> None:
    from saelab.sae.base import SAE

    assert set(ArchConfig.registry) == set(SAE.registry)
    for name, cls in ArchConfig.registry.items():
        module = cls.__module__
        assert SAE.registry[name].__module__ == module, f"{name}: its config and its SAE are apart"
        assert module.startswith("saelab.sae."), module
    # No string comparison with an architecture's name in the loop, the sweep, the flags or the CLI:
    # what differs between architectures comes from their configs.
    allowed = {("train/config.py", "topk")}  # the default architecture
    for path in [*(SRC / "train").rglob("*.py"), SRC / "flags.py", SRC / "cli.py"]:
        rel = str(path.relative_to(SRC))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ArchConfig.registry:
                where = f"{rel}:{node.lineno}"
                assert (rel, node.value) in allowed, f"{where} names the architecture {node.value!r}"
