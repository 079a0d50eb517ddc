"""The main job is ``dip-ext prune`` with no flags: the README states the recipe its defaults run, ``make prune``
passes no flag, and the CLI's defaults, their automatic choices made for the default model (LLaMA-style, three KV
groups per layer, a tokenizer) on this machine (a CPU with bf16 instructions), are exactly what the README's recipe
flags parse to. Elsewhere those choices fall back as the README says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import dataclasses

import pytest
from transformers import LlamaConfig

from dip_ext.cli import prune_option_classes
from dip_ext.config import PruneConfig
from dip_ext.options import OptionParser
from dip_ext.recovery import RecoveryConfig
from dip_ext.recovery import config as recovery_config
from dip_ext.selection.budget import heads_by_default

ROOT = Path(__file__).resolve().parents[1]
#: the sentence of the README that spells the recipe: "... its defaults, the measured recipe: `FLAGS` ..."
RECIPE = re.compile(r"defaults are the measured recipe:\s*`dip-ext prune ([^`]+)`")


def _parsed(argv: list[str]) -> list:
    return OptionParser(dataclass_types=prune_option_classes()).parse_args_into_dataclasses(argv)


#: the default model's attention (SmolLM2-135M: 9 query heads over 3 KV heads), at a small width
SMOLLM2_LIKE = LlamaConfig(hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=64)


def _resolved(options: list, config, *, native: bool, tokenizer: bool = True) -> list:
    """``options`` with the automatic choices made as a run of a model of ``config`` makes them."""
    out = []
    for o in options:
        if isinstance(o, PruneConfig) and o.prune_heads is None:
            o = dataclasses.replace(o, prune_heads=heads_by_default(config))
        if isinstance(o, RecoveryConfig):
            saved = recovery_config.bf16_native
            recovery_config.bf16_native = lambda device: native
            try:
                o = o.resolved("cpu", tokenizer=tokenizer)
            finally:
                recovery_config.bf16_native = saved
        out.append(o)
    return out


def test_readme_states_the_recipe_the_cli_defaults_run():
    found = RECIPE.findall(" ".join(ROOT.joinpath("README.md").read_text().split()))
    assert len(found) == 1, "the README must state the recipe once: defaults are the measured recipe: `dip-ext prune …`"
    flags = shlex.split(found[0])
    assert _parsed(flags) != _parsed([])  # four of its options are automatic choices...
    assert _resolved(_parsed(flags), SMOLLM2_LIKE, native=True) == _resolved(_parsed([]), SMOLLM2_LIKE, native=True)
    # every option the recipe spells is one a user would otherwise have to pass: the recipe names the main ones
    assert {"--method", "--refit", "--recover", "--recover-batch", "--recover-steps", "--recover-data",
            "--prune-heads", "--recover-autocast", "--recover-teacher-dtype"} <= set(flags)


@pytest.mark.parametrize("what", ["no bf16", "no tokenizer", "one KV head", "opt"])
def test_the_automatic_choices_fall_back_as_the_readme_says(what):
    """Without bf16 instructions: fp32 (no autocast, the teacher as loaded); without a tokenizer: calibration text
    only; a single KV head per layer or a family whose vLLM route needs whole attentions: heads kept whole."""
    config = SMOLLM2_LIKE
    if what == "one KV head":
        config = LlamaConfig(**{**SMOLLM2_LIKE.to_dict(), "num_key_value_heads": 1})
    if what == "opt":
        from transformers import OPTConfig
        config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                           word_embed_proj_dim=32)
    prune, *_, recovery, _, _ = _resolved(_parsed([]), config, native=what != "no bf16",
                                          tokenizer=what != "no tokenizer")
    assert prune.prune_heads is (what in ("no bf16", "no tokenizer"))
    assert recovery.recover_data == ("text" if what == "no tokenizer" else "mix")
    assert recovery.recover_autocast is (what != "no bf16")
    assert recovery.recover_teacher_dtype == ("same" if what == "no bf16" else "bfloat16")


def test_make_prune_passes_no_flag():
    makefile = ROOT.joinpath("Makefile").read_text()
    recipe = re.search(r"^prune:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    assert [line.strip() for line in recipe.group(1).splitlines()] == ["$(VENV)/bin/dip-ext prune"]
