"""The README stays true: every config key is documented, shipped configs and commands exist."""

from __future__ import annotations

import re

from launcher.cli import _parser
from launcher.config import field_docs

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_config_reference_lists_every_key_with_its_default():
    for key, _type, default in field_docs():
        row = re.search(rf"^\| `{re.escape(key)}` \|(?:[^|\\]|\\\|)*\| `([^`]*)` \|", README, re.M)
        assert row, f"{key} missing from README's config reference"
        # Markdown tables escape "|" as "\|", also inside code.
        assert row.group(1).replace("\\|", "|") == default, f"{key}: README says {row.group(1)}, code says {default}"


def test_readme_names_only_shipped_configs_and_real_subcommands():
    named = set(re.findall(r"configs/train/([\w.]+\.yaml)", README))
    assert len(named) > 5, named
    for name in named:
        assert (ROOT / "configs" / "train" / name).is_file(), name
    commands = set(_parser()._subparsers._group_actions[0].choices)
    used = set(re.findall(r"^launcher (\w+)", README, re.M))
    assert {"train", "eval", "predict", "export"} <= used, used
    for cmd in used:
        assert cmd in commands, cmd
    assert "make demo" in README and "make test" in README


def test_the_count_of_bad_inputs_the_readme_gives_is_the_table_s():
    import test_bad_inputs

    said = re.search(r"`tests/test_bad_inputs.py` holds (\d+) such inputs", README)
    assert said and int(said.group(1)) == len(test_bad_inputs.CASES)


def test_the_layout_names_every_module_and_benchmark():
    """The README's Layout section is the map of the code: a module or benchmark added without
    a line there is one a reader cannot find (six modules and a benchmark were missing)."""
    layout = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    modules = [p for p in (ROOT / "launcher").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    benchmarks = [p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")]
    assert len(modules) > 20 and len(benchmarks) > 5
    missing = [str(p.relative_to(ROOT)) for p in modules + benchmarks if not re.search(rf"\b{re.escape(p.name)}\b", layout)]
    assert not missing, f"not in the README's Layout: {missing}"
