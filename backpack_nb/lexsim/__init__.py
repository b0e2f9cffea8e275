"""Word similarity on Multi-SimLex: do a model's word representations rank word pairs as
people do, within a language and across languages?

Six of Multi-SimLex's 12 languages are Europarl languages (ENG en, FRA fr, FIN fi, SPA es,
EST et, POL pl); a run is scored in those of its languages that Multi-SimLex has, and the
rest are reported as not in the corpus. A word is looked up in its mid-sentence form
(leading space), lower-cased, with a parenthesised note removed (``abikaasa (naine)`` ->
``abikaasa``).

- :mod:`.benchmark`: the Multi-SimLex files (finding, fetching, reading, checking);
- :mod:`.representations`: word vectors of each method (embedding, random, senses) and how
  often words occur in the training data;
- :mod:`.scoring`: the three scores (monolingual and cross-lingual Spearman, retrieval) with
  the held-out best sense, and :func:`write_lexsim` for a checkpoint;
- :mod:`.tables`: tables and figures of one or several models' results, and which sense
  carries a pair's similarity;
- ``python -m backpack_nb.lexsim``: the command line (:mod:`.__main__`).

Bootstrap intervals and Spearman's rho come from :mod:`backpack_nb.stats`.
"""

from .benchmark import (
    EUROPARL_CODES,
    FILES,
    MULTISIMLEX_LANGS,
    OFFICIAL_URL,
    MultiSimLex,
    load_multisimlex,
    normalize_word,
    resolve_source,
)
from .representations import WordVectors, corpus_counts, has_senses, sense_methods, word_vectors
from .scoring import (
    DEFAULT_MIN_COUNT,
    LEAD_METHODS,
    choose_sense,
    evaluate_lexsim,
    heldout_halves,
    select_sense,
    write_lexsim,
)
from .tables import LexsimTable, PairSenseTable, comparison_figure, format_table, pair_senses, side_by_side

__all__ = [
    "DEFAULT_MIN_COUNT", "EUROPARL_CODES", "FILES", "LEAD_METHODS", "MULTISIMLEX_LANGS", "OFFICIAL_URL",
    "LexsimTable", "MultiSimLex", "PairSenseTable", "WordVectors",
    "choose_sense", "comparison_figure", "corpus_counts", "evaluate_lexsim", "format_table", "has_senses",
    "heldout_halves", "load_multisimlex", "normalize_word", "pair_senses", "resolve_source", "select_sense",
    "sense_methods", "side_by_side", "word_vectors", "write_lexsim",
]
