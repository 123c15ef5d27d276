"""Every entry point imports on its own: no import cycle depends on which package loads first.

Each module is imported first thing in a fresh interpreter (the situation of ``peftkit eval`` or a
user script), all in parallel.
"""

import subprocess
import sys

import pytest

# One per package (a package's __init__ pulls in its modules), plus the two config loaders.
ENTRY_MODULES = [
    "peftkit.cli.main",
    "peftkit.data",
    "peftkit.evaluation.run",
    "peftkit.methods",
    "peftkit.models",
    "peftkit.training.run",
]


@pytest.mark.slow
def test_each_entry_module_imports_first():
    processes = {
        name: subprocess.Popen([sys.executable, "-c", f"import {name}"], stderr=subprocess.PIPE, text=True)
        for name in ENTRY_MODULES
    }
    failures = {name: p.communicate()[1].strip().splitlines()[-1:] for name, p in processes.items() if p.wait()}
    assert not failures, failures


# Training uses evaluation (task metrics during training); evaluation never uses training, so each
# reads on its own. Data, models and methods use neither.
ONE_WAY = {
    "peftkit.evaluation": ("peftkit.training",),
    "peftkit.evaluation.run": ("peftkit.training",),
    "peftkit.evaluation.training": ("peftkit.training",),
    "peftkit.data": ("peftkit.training", "peftkit.evaluation"),
    "peftkit.models": ("peftkit.training", "peftkit.evaluation"),
    "peftkit.methods": ("peftkit.training", "peftkit.evaluation"),
}


@pytest.mark.parametrize(("module", "forbidden"), ONE_WAY.items())
def test_package_dependencies_are_one_way(module, forbidden):
    code = f"import sys, {module}; print([m for m in sys.modules if m.startswith({forbidden!r})])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
