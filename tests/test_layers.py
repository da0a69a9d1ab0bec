"""The house drawn from the imports: each module of pcl_hpc imports only its own layer or the ones below,
heavy dependencies are imported only by the part that owns them, and launchers/ holds only the entry."""

import ast
from pathlib import Path

from tests.conftest import REPO

# Lowest first. A module may import its own layer and any layer below it, never one above.
LAYERS = [
    ["errors", "atomic", "config", "dist"],
    ["data", "models", "losses", "optim", "metrics", "inference"],
    ["engine", "tracking", "nnunet"],  # nnunet: nnU-Net's plans, preprocessed data and hand-off file
    ["evaluate", "summary", "train", "probes"],  # probes: an encoder judged without fine-tuning it
    ["plan"],  # steps, tasks, the local runner
    ["sweep", "predict", "export"],  # the protocol builds its plan
    ["pipeline", "demo"],  # the plans a runner is given
    ["cli", "__main__", "__init__"],
    ["launch"],  # submitit: runs the plans (and the CLI's commands) on SLURM
]
OWNERS = {"submitit": "launch", "mlflow": "tracking", "deepspeed": "engine", "nnunetv2": "nnunet",
          "dynamic_network_architectures": "nnunet"}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            if node.module == "pcl_hpc":
                out += [f"pcl_hpc.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_no_import_runs_up_a_layer_and_heavy_dependencies_stay_with_their_owner():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    root = REPO / "pcl_hpc"
    tops = {p.name.removesuffix(".py") for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert tops <= set(rank), f"modules with no layer: {sorted(tops - set(rank))} (add them to LAYERS)"
    upward, misplaced = [], []
    for path in sorted(root.rglob("*.py")):
        top = path.relative_to(root).parts[0].removesuffix(".py")
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "pcl_hpc" and len(parts) > 1 and rank.get(parts[1], -1) > rank[top]:
                upward.append(f"{path.relative_to(REPO)} imports {module}")
            if parts[0] in OWNERS and top != OWNERS[parts[0]]:
                misplaced.append(f"{path.relative_to(REPO)} imports {parts[0]} (only pcl_hpc/{OWNERS[parts[0]]} may)")
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)
    assert not misplaced, "\n".join(misplaced)


def test_launchers_holds_only_the_entry_script():
    assert sorted(p.name for p in (REPO / "launchers").iterdir() if p.name != "__pycache__") == ["slurm.py"]
    assert "from pcl_hpc.launch.cli import main" in (REPO / "launchers" / "slurm.py").read_text()
