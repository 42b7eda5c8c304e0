"""The layering of the code, read from the imports themselves (ast, nothing is imported).

Bottom to top: errors, settings and atomic writes; artifacts (manifests); data; models; the training loop; losses; inference and
scoring (shared by every stage); the five stages side by side (finetune, distill, prune, export, quantize);
run, bench, report and the baseline; the CLI and serving. An import only points down or sideways within a
layer, and no stage imports another stage.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGES = {"pipeline.finetune", "pipeline.distill", "pipeline.prune", "pipeline.export", "pipeline.quantize",
          "pipeline.vocab"}
LAYERS = [
    {"pipeline.errors", "pipeline.settings", "pipeline.providers", "pipeline.atomic"},
    {"pipeline.artifacts"},  # manifests and their checks: every loader verifies what it loads
    {"pipeline.data"},
    {"pipeline.models", "pipeline.modeling_pruned_bert"},
    {"pipeline.training", "pipeline.tracking"},
    {"pipeline.losses", "pipeline.capture"},
    {"pipeline.inference", "pipeline.onnx_runtime", "pipeline.evaluate", "pipeline.onnx_utils"},
    STAGES,
    {"pipeline.run", "pipeline.budget", "pipeline.bench", "pipeline.bench_text", "pipeline.report",
     "pipeline.report_serving", "pipeline.report_real_text", "pipeline.report_budget", "pipeline.baseline"},
    {"pipeline.cli", "serving"},
]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "serving").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "pipeline":
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (lazy imports included)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def unit(module: str) -> str:
    """The layer unit a module belongs to: a stage package counts as one (`pipeline.distill.kd` -> distill)."""
    for layer in LAYERS:
        for u in sorted(layer, key=len, reverse=True):
            if module == u or module.startswith(u + "."):
                return u
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


def rank(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit(module) in layer)


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain without repeating a module (the height of the import graph)."""
    memo: dict[str, list[str]] = {}

    def walk(m: str, seen: frozenset) -> list[str]:
        if m in memo:
            return memo[m]
        best = [m]
        for d in graph[m]:
            if d not in seen:
                chain = [m] + walk(d, seen | {d})
                if len(chain) > len(best):
                    best = chain
        memo[m] = best
        return best

    return max((walk(m, frozenset({m})) for m in graph), key=len)


def test_no_stage_imports_another_stage():
    bad = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
           if unit(a) in STAGES and unit(b) in STAGES and unit(a) != unit(b)]
    assert not bad, bad


def test_imports_only_point_down():
    bad = [f"{a} (layer {rank(a)}) -> {b} (layer {rank(b)})" for a, targets in import_graph().items()
           for b in targets if rank(b) > rank(a)]
    assert not bad, bad


def test_import_graph_height(capsys):
    chain = longest_chain(import_graph())
    with capsys.disabled():
        print(f"\nlongest import chain: {len(chain)} modules: {' -> '.join(chain)}")
    assert len(chain) <= len(LAYERS) + 2  # a few steps inside the data and distill packages, no more
