"""Random bad values for every ``dip-ext prune`` option: exit status 2 with one line on stderr, never a traceback,
and nothing written.

The bad values come from each option's own declaration (its type, range and choices in the options dataclasses)
plus values that are only bad in relation to the model (windows longer than its positions, a rounding multiple
wider than every width) or to this machine (devices it does not have, texts that do not exist).
"""

import dataclasses
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import tiny_llama

from dip_ext.cli import prune_option_classes, main

NOT_NUMBERS = st.sampled_from(["", "x", "1e", "--", "one", "0x1g", "1,5"])


def _bad_values(f: dataclasses.Field, hint) -> st.SearchStrategy:
    """Strings that are not a valid value of the option ``f`` (annotation ``hint``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union else hint
    meta = f.metadata
    if typing.get_origin(base) is typing.Literal:
        choices = set(typing.get_args(base))
        return st.text(min_size=1, max_size=8).filter(lambda s: s not in choices and not s.startswith("-"))
    if base is int:
        low = meta.get("minimum", meta.get("above", -math.inf))
        below = st.integers(max_value=int(low) - 1).map(str) if math.isfinite(low) else st.nothing()
        return below | NOT_NUMBERS | st.just("1.5")
    if base is float:
        out = [NOT_NUMBERS, st.sampled_from(["nan", "inf", "-inf"])]
        if "above" in meta:
            out.append(st.floats(max_value=meta["above"], allow_nan=False, allow_infinity=False).map(repr))
        if "minimum" in meta:
            out.append(st.floats(max_value=meta["minimum"], exclude_max=True, allow_nan=False,
                                 allow_infinity=False).map(repr))
        if "below" in meta:
            out.append(st.floats(min_value=meta["below"], allow_nan=False, allow_infinity=False).map(repr))
        return st.one_of(*out)
    if base is bool:
        return st.just(None)  # a value after a flag that takes none
    return st.nothing()


def _option_cases():
    cases = []
    for cls in prune_option_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            strategy = _bad_values(f, hints[f.name])
            if not strategy.is_empty:
                cases.append(st.tuples(st.just(flag), strategy))
    return cases


RELATIONAL = [
    ("--seq-len", "65"),            # the tiny model has 64 positions
    ("--eval-seq-len", "1000"),
    ("--multiple-of", "4096"),      # wider than every width
    ("--method", "magic"),
    ("--calibration", "nosuchtext"),
    ("--calibration", "file:/nonexistent/text.txt"),
    ("--eval-text", "c4"),
    ("--model", "/nonexistent/model/folder"),
    ("--device", "tpu"),
    ("--device", "cuda:7"),
    ("--decay-steps", "5"),          # only with --lr-schedule cosine-tail
    ("--lr-schedule", "cosine-tail"),  # needs --decay-steps
    ("--steps", "9"),                # with --method oneshot below: an option of another method
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, word_tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    return folder


def _run_bad(case, folder, word_text, out, capsys):
    flag, value = case
    argv = ["prune", "--model", str(folder), "--calibration", word_text, "--eval-text", word_text,
            "--out", str(out), "--quiet"]
    if flag == "--steps":
        argv += ["--method", "oneshot"]
    argv += [flag] if value is None else [flag, value]
    if value is None:
        argv += ["yes"]
    before = torch.get_num_threads()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("dip-ext") and "Traceback" not in err, (argv, err)
    assert not out.exists()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.one_of(*_option_cases()))
def test_a_bad_value_of_any_option_is_one_line_and_exit_2(case, tiny_folder, word_text, tmp_path_factory, capsys):
    _run_bad(case, tiny_folder, word_text, tmp_path_factory.mktemp("out") / "run", capsys)


@pytest.mark.parametrize("case", RELATIONAL, ids=lambda c: f"{c[0]}={c[1]}")
def test_a_value_bad_for_this_model_or_machine_is_one_line_and_exit_2(case, tiny_folder, word_text, tmp_path,
                                                                       capsys):
    _run_bad(case, tiny_folder, word_text, tmp_path / "run", capsys)
