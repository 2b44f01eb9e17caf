"""The generated config reference in docs/ matches the config dataclasses."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_config_reference", DOCS / "make_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    committed = (DOCS / "configs.md").read_text()
    assert committed == _generator().render(), (
        "docs/configs.md is stale: regenerate it with `python docs/make_config_reference.py`"
    )
