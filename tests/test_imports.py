"""Imports flow one way and cost only what they use (docs/ARCHITECTURE.md, issue 14).

Checked two ways: in a fresh interpreter, which modules a command really loads (`sys.modules`); and
in the source, which patchbench modules each module imports (the layers may only import downwards).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import runfixtures as fx

SRC = Path(__file__).resolve().parents[1] / "src" / "patchbench"
HEAVY = ("torch", "patchbench.train", "patchbench.models", "patchbench.data", "patchbench.study",
         "patchbench.evaluate", "patchbench.cpu", "patchbench.bench")


def loaded_by(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running `code`."""
    probe = (f"import sys\n{code}\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith({HEAVY[1:]!r})))")
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["models", "--help"], ["train", "--help"],
                                  ["compare", "--help"]])
def test_help_and_version_load_no_torch_and_no_training_code(argv):
    code = f"from patchbench.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert loaded_by(code) == []


def test_report_loads_neither_torch_nor_training_code(tmp_path):
    study = fx.write_compare_study(tmp_path / "study")
    code = f"from patchbench.cli import main\nassert main(['report', {str(study)!r}, '--format', 'md']) == 0"
    assert loaded_by(code) == []


def test_version_imports_no_torch_by_importtime():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "patchbench", "--version"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "patchbench" in done.stdout
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert imported and not any(name == "torch" or name.startswith("torch.") for name in imported)


# The layers, lowest first; a module may import patchbench modules of its own layer or below only.
LAYERS = [
    {"errors", "values", "compute"},
    {"device", "rundir", "config", "recipes"},
    {"flops", "metrics", "checkpoint", "optim", "models", "report"},
    {"cpu"},  # CPU speed code: swaps models' layers, so models must never import it
    {"data"},
    {"evaluate", "bench", "autotune"},
    {"train"},
    {"study"},
    {"commands"},
    {"cli", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py")


def _imports(path: Path, src: Path = SRC) -> set[str]:
    """The patchbench modules `path` imports: `import patchbench.x`, `from patchbench.x import y` and
    `from patchbench import x` where x is a module of the package at `src`."""
    tree = ast.parse(path.read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module == "patchbench":
            found |= {f"patchbench.{a.name}" for a in n.names
                      if (src / a.name).is_dir() or (src / f"{a.name}.py").exists()}
        elif isinstance(n, ast.ImportFrom) and n.module:
            found.add(n.module)
    return {m for m in found if m.startswith("patchbench.")}


def upward_imports(src: Path) -> list[str]:
    """Every import in the package at `src` of a module of a higher layer than the importer's."""
    wrong = []
    for path in sorted(src.rglob("*.py")):
        module = "patchbench." + ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        if module == "patchbench.__init__":
            continue
        for imported in _imports(path, src):
            if _layer(imported) > _layer(module):
                wrong.append(f"{module} imports {imported}")
    return wrong


def test_imports_flow_downwards():
    assert upward_imports(SRC) == []


@pytest.mark.parametrize("line, imported", [("from patchbench.cpu.layers import use_fast_kernels", "patchbench.cpu.layers"),
                                            ("from patchbench import cpu", "patchbench.cpu"),
                                            ("import patchbench.cpu.ops", "patchbench.cpu.ops")])
def test_the_layer_check_catches_models_importing_the_cpu_package(tmp_path, line, imported):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "convmixer.py").write_text(f"{line}\nfrom patchbench.config import RunConfig\n")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "layers.py").write_text("from patchbench.models.layers import Residual\n")  # allowed
    assert upward_imports(tmp_path) == [f"patchbench.models.convmixer imports {imported}"]


def test_report_modules_import_one_way():
    allowed = {"load": {"patchbench.rundir", "patchbench.config", "patchbench.errors", "patchbench.compute",
                        "patchbench.values"},
               "stats": {"patchbench.report.load"},
               "figures": {"patchbench.report.load", "patchbench.compute"},
               "render": {"patchbench.rundir", "patchbench.errors", "patchbench.compute", "patchbench.report.figures",
                          "patchbench.report.load", "patchbench.report.stats"}}
    for name, ok in allowed.items():
        assert _imports(SRC / "report" / f"{name}.py") <= ok, name
