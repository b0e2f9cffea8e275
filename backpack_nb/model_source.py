"""What a model source names, as text: ``init_from``'s ``scratch`` (a new run) and ``resume``,
or a pretrained model (``hf:<repo id>``, or a folder holding a Hugging Face model's
config.json). The configuration checks these names; :mod:`backpack_nb.hub` reads the models
and :mod:`backpack_nb.loading` picks the reader. No torch here: the configuration imports it."""

from __future__ import annotations

import os

from backpack_nb.paths import resolve_in_root

INIT_FROM = ("scratch", "resume")
HF_PREFIX = "hf:"
# Both Hugging Face architectures read GPT-2's byte-level BPE (tiktoken's name for it), in its
# own ids: the encoding a pretrained model's data is prepared with.
PRETRAINED_ENCODING = "gpt2"


def is_pretrained(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a pretrained model (``hf:<repo id>`` or a folder holding
    config.json) rather than a project checkpoint."""
    s = str(spec)
    return s.startswith(HF_PREFIX) or (resolve_in_root(s) / "config.json").is_file()
