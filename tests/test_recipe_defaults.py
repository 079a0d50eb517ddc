"""The main job is ``dip-ext prune`` with no flags: the README states the recipe its defaults run, ``make prune``
passes no flag, and the CLI's defaults parse to exactly what the README's recipe flags parse to."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from dip_ext.cli import prune_option_classes
from dip_ext.options import OptionParser

ROOT = Path(__file__).resolve().parents[1]
#: the sentence of the README that spells the recipe: "... its defaults, the measured recipe: `FLAGS` ..."
RECIPE = re.compile(r"defaults are the measured recipe:\s*`dip-ext prune ([^`]+)`")


def _parsed(argv: list[str]) -> list:
    return OptionParser(dataclass_types=prune_option_classes()).parse_args_into_dataclasses(argv)


def test_readme_states_the_recipe_the_cli_defaults_run():
    found = RECIPE.findall(" ".join(ROOT.joinpath("README.md").read_text().split()))
    assert len(found) == 1, "the README must state the recipe once: defaults are the measured recipe: `dip-ext prune …`"
    flags = shlex.split(found[0])
    assert _parsed(flags) == _parsed([])
    # every option the recipe spells is one a user would otherwise have to pass: the recipe names the main ones
    assert {"--method", "--refit", "--recover", "--recover-batch", "--recover-steps", "--recover-data"} <= set(flags)


def test_make_prune_passes_no_flag():
    makefile = ROOT.joinpath("Makefile").read_text()
    recipe = re.search(r"^prune:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    assert [line.strip() for line in recipe.group(1).splitlines()] == ["$(VENV)/bin/dip-ext prune"]
