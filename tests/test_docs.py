"""The documentation cannot drift: docs/methods.md is what docs/generate_methods.py makes of the catalogue now, the
README's quickstart runs, every relative link and anchor in README.md and docs/ resolves, and every
``tda_explorer.…`` name they mention exists."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_methods", ROOT / "docs" / "generate_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_page_is_generated_from_the_current_catalogue():
    generated = _generator().render()
    current = (ROOT / "docs" / "methods.md").read_text()
    assert current == generated, "docs/methods.md is stale: run .venv/bin/python docs/generate_methods.py"


def test_methods_page_lists_every_method_and_option():
    from tda_explorer.compute.catalogue import CATALOGUE

    page = (ROOT / "docs" / "methods.md").read_text()
    for name, spec in CATALOGUE.items():
        section = page.split(f"\n### {name}\n", 1)
        assert len(section) == 2, f"{name} has no section"
        body = section[1].split("\n### ", 1)[0]
        for info in spec.argument_info():
            assert f"`{info.name}`" in body, f"{name}: option {info.name} missing"


def test_every_registered_method_is_in_the_catalogue():
    """A method module registers itself when imported; compute/methods/__init__.py must import it, or the catalogue
    (the CLI, the explorer and docs/methods.md) misses it."""
    from tda_explorer.compute.catalogue import CATALOGUE

    registered = {}
    for path in (ROOT / "tda_explorer").rglob("*.py"):
        for name in re.findall(r'@register\(\s*"([^"]+)"', path.read_text()):
            registered[name] = path.relative_to(ROOT)
    assert registered, "no @register( found: has the catalogue's decorator been renamed?"
    missing = {name: str(path) for name, path in registered.items() if name not in CATALOGUE}
    assert not missing, f"registered but not imported by tda_explorer.compute.methods: {missing}"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_runs_on_a_small_model(tmp_path, monkeypatch):
    """The README's python block, as written, on a small MLP trained on scikit-learn's digits."""
    from sklearn.datasets import load_digits

    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 1, "the README has one python block, the quickstart"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 10, "the quickstart is ten lines at most"

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:400]), y[:400]).backward()
        optimizer.step()

    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "x_train": x[:400], "y_train": y[:400], "x_test": x[400:500],
                 "y_test": y[400:500], "class_names": [str(d) for d in range(10)]}
    tree = ast.parse(code)
    for i, node in enumerate(tree.body):  # keep what each expression statement shows in a notebook
        if isinstance(node, ast.Expr):
            tree.body[i] = ast.copy_location(ast.Assign([ast.Name(f"_shown_{i}", ast.Store())], node.value), node)
    exec(compile(ast.fix_missing_locations(tree), "README.md quickstart", "exec"), namespace)
    shown = [value for name, value in sorted(namespace.items()) if name.startswith("_shown_")]

    session = namespace["session"]
    assert session.attributions["grad-dot"].scores.shape == (100, 400)
    ranking = session.mislabel_ranking("grad-dot")
    assert len(ranking) == 400 and list(ranking["rank"][:3]) == [1, 2, 3]
    assert (tmp_path / "my_session" / "flags.sqlite").exists()
    from tda_explorer.widgets import Explorer

    assert any(isinstance(value, Explorer) for value in shown), "the quickstart ends with the explorer"


def _slug(heading: str) -> str:
    return _generator().slug(heading)


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # external
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def _resolve(dotted: str) -> str | None:
    """None when ``dotted`` names a module or an attribute of one; else what is missing."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as err:
            if err.name and not err.name.startswith("tda_explorer"):
                return None  # an optional dependency this environment lacks
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{'.'.join(parts[:i])} has no {attr}"
            obj = getattr(obj, attr)
        return None
    return "no such module"


def test_every_tda_explorer_name_in_the_docs_exists():
    names = set()
    for page in PAGES:
        names |= {m.rstrip(".") for m in re.findall(r"tda_explorer(?:\.[A-Za-z_]\w*)+\.?", page.read_text())}
    assert names
    missing = {name: why for name in sorted(names) if (why := _resolve(name))}
    assert not missing, f"names in README.md / docs/ that do not exist: {missing}"
