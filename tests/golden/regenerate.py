"""Rewrites the golden files of tests/test_golden.py from what the code does NOW.

Run it only deliberately, after a behaviour change you mean to keep (the tests never run it):

    PYTHONPATH=$PWD python tests/golden/regenerate.py     # rewrites tests/golden/prune.json and
                                                          # tests/golden/budget_rounding.json
    git diff tests/golden/                                # review exactly what changed; commit it together
                                                          # with the change that caused it

``--out DIR`` writes the files elsewhere (e.g. to compare two runs), ``--threads N`` runs with N intra-op
threads instead of 1 (the tests use 1; use it to see which values depend on the thread count),
``--only main`` / ``--only budget`` writes one of the two files. The CLI flag list (cli_flags.json) is not
written here: it is the set of flags users rely on, edited by hand (see tests/test_golden_cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TESTS / "golden", help="folder for the JSON files")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as the tests)")
    ap.add_argument("--only", choices=("main", "budget"), default=None, help="write only one of the two files")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dip-golden-") as tmp:
        os.environ["DIP_EXT_CACHE"] = str(Path(tmp) / "cache")  # the tests use a fresh cache too
        return _write(args, Path(tmp))


def _write(args, tmp: Path) -> int:
    sys.path.insert(0, str(TESTS))
    import torch
    import transformers

    import test_golden as tg
    from conftest import make_word_tokenizer, write_word_text

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    tokenizer = make_word_tokenizer()
    text = write_word_text(tmp)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=TESTS, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    about = {"generated_by": "tests/golden/regenerate.py (do not edit by hand; see tests/test_golden.py)",
             "generated_at_commit": commit, "torch": torch.__version__, "transformers": transformers.__version__,
             "threads": args.threads}
    files = {"main": (tg.MAIN_FILE.name, tg.CASES, {}),
             "budget": (tg.BUDGET_FILE.name, tg.BUDGET_CASES, {})}
    args.out.mkdir(parents=True, exist_ok=True)
    for key, (name, cases, flags) in files.items():
        if args.only not in (None, key):
            continue
        data = {**flags, "about": about, "common_options": tg.COMMON, "inputs": tg.input_digests(tokenizer, text),
                "cases": {case: {"family": family, "options": tg.recorded_options(options),
                                 **tg.observe(family, options, tokenizer, text)}
                          for case, (family, options) in cases.items()}}
        (args.out / name).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out / name} ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
