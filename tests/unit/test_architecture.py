"""The layering of docs/architecture.md, checked on the import statements."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "roompay"

FRAMEWORKS = ("fastapi", "starlette", "sqlalchemy", "alembic", "uvicorn", "jinja2")
FORBIDDEN = {
    "domain": (
        *FRAMEWORKS,
        "httpx",
        "paho",
        "amqtt",
        "roompay.store",
        "roompay.web",
        "roompay.services",
        "roompay.payments",
        "roompay.iot",
    ),
    "protocol": (*FRAMEWORKS, "roompay.store", "roompay.web", "roompay.services"),
    "payments": (
        "fastapi",
        "starlette",
        "sqlalchemy",
        "roompay.store",
        "roompay.web",
        "roompay.services",
        "roompay.sandbox",
    ),
    "device": (*FRAMEWORKS, "roompay.store", "roompay.web", "roompay.services", "roompay.payments"),
    "services": ("fastapi", "starlette", "uvicorn", "roompay.web"),
    "store": ("fastapi", "roompay.web", "roompay.services", "roompay.payments"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, by its full dotted name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_it_must_not(layer: str) -> None:
    offences = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in imported_modules(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                offences.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert offences == []


def test_the_rule_would_catch_an_offence(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from sqlalchemy.orm import Session\nimport fastapi\n")
    assert imported_modules(sample) == {"sqlalchemy.orm", "fastapi"}
