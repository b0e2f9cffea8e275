"""The tiktoken loader and the compact vocabulary (backpack_nb.tokenizer)."""

from __future__ import annotations

import base64
import contextlib
import random

import numpy as np
import pytest

from backpack_nb import dataset
from backpack_nb.errors import UserError
from backpack_nb.tokenizer import Tokenizer, get_encoding

CJK = "日本語のテキストを分割します。中文字符串测试，한국어 문장입니다。"


@pytest.fixture(scope="module")
def tok(prepared_europarl) -> Tokenizer:
    return dataset.load_tokenizer(prepared_europarl)


# ----------------------------------------------------------------------------------------
# loading encodings


def test_cl100k_offline():
    enc = get_encoding("cl100k_base")
    assert enc.n_vocab == 100277
    assert enc.decode(enc.encode_ordinary("Resumption of the session")) == "Resumption of the session"
    assert enc.encode_single_token("<|endoftext|>") == 100257


def test_missing_tiktoken_file_names_the_path():
    with pytest.raises(UserError) as ei:
        get_encoding("gpt2:/nonexistent.tiktoken")
    assert "/nonexistent.tiktoken" in str(ei.value)


def test_unknown_encoding_name():
    with pytest.raises(UserError) as ei:
        get_encoding("no_such_encoding_xyz")
    assert "no_such_encoding_xyz" in str(ei.value)


def test_unknown_encoding_name_with_local_file(tmp_path):
    f = tmp_path / "x.tiktoken"
    f.write_text("")
    with pytest.raises(UserError) as ei:
        get_encoding(f"no_such_encoding_xyz:{f}")
    assert "no_such_encoding_xyz" in str(ei.value)


def test_corrupt_tiktoken_file(tmp_path):
    f = tmp_path / "broken.tiktoken"
    f.write_text("this is not@@ a tiktoken file\nat all\n")
    with pytest.raises(UserError) as ei:
        get_encoding(f"cl100k_base:{f}")
    assert str(f) in str(ei.value)


def test_local_tiktoken_file_matches_bundled(tmp_path):
    """NAME:PATH reads the ranks from a local file and keeps NAME's pattern and specials."""
    bundled = get_encoding("cl100k_base")
    f = tmp_path / "cl100k_base.tiktoken"
    specials = {bundled.encode_single_token(t) for t in bundled.special_tokens_set}
    ranks = {}  # every ordinary token's bytes, by id: the ranks, read through the public API
    for i in range(bundled.n_vocab):
        if i not in specials:
            with contextlib.suppress(KeyError):  # the ids between the ranks and the specials
                ranks[bundled.decode_single_token_bytes(i)] = i
    f.write_bytes(b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in ranks.items()))
    local = get_encoding(f"cl100k_base:{f}")
    assert local is not bundled
    assert local.n_vocab == bundled.n_vocab == 100277
    text = "Madame la Présidente, I'd like 2 000 € — merci!\n"
    assert local.encode_ordinary(text) == bundled.encode_ordinary(text)
    assert local.encode_single_token("<|endoftext|>") == bundled.encode_single_token("<|endoftext|>")


# ----------------------------------------------------------------------------------------
# the compact vocabulary


def _random_strings() -> list[str]:
    rng = random.Random(20240117)
    out = [
        "Καλημέρα σας, κυρία Πρόεδρε· Επαvάληψη της συvσδoυ.",
        "Hyvää huomenta! Äänestys pidetään huomenna klo 12.00; öljyä ja yötä.",
        "emoji 🇪🇺🙂👍🏽 👩‍👩‍👧‍👦 ✔️",
        CJK,
        "<|endoftext|>",
        "a<|endoftext|>b <|endoftext|>\n<|endoftext|><|endoftext|>",
        "<|fim_prefix|><|endofprompt|>",
        "",
        " ",
        "\n\n\n  \t\r\n",
        "\x00\x01\x7f\x80\x9f\xa0\xad\ufeff\ufffd\U0010ffff",
    ]
    valid = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(40):  # any code point but surrogates
        out.append("".join(chr(rng.choice(valid)) for _ in range(rng.randint(1, 60))))
    for _ in range(20):  # mostly rare multi-byte characters between a few common ones
        pool = [chr(rng.randint(0x80, 0x7FF)) for _ in range(8)]
        pool += [chr(rng.choice(valid[0x800:0xF800])) for _ in range(8)]  # 3-byte, no surrogates
        out.append("".join(rng.choice(pool + [" ", "e", "\n"]) for _ in range(rng.randint(1, 80))))
    for _ in range(20):  # random bytes, read as UTF-8 with replacements or as Latin-1
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
        out.append(raw.decode("utf-8", errors="replace"))
        out.append(raw.decode("latin-1"))
    return out


@pytest.mark.parametrize("s", _random_strings(), ids=lambda s: repr(s[:12]))
def test_roundtrip_unicode(tok, s):
    ids = tok.encode(s)
    assert all(isinstance(i, int) for i in ids)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")
    if tok.eot_id is not None:
        assert tok.eot_id not in ids  # special-token text is plain text


def test_compact_vocab_shape(tok, prepared_europarl):
    enc = get_encoding("cl100k_base")
    assert 256 < tok.vocab_size < enc.n_vocab
    assert np.all(np.diff(tok.base_ids) > 0)
    # every single byte and the specials are kept
    for b in range(256):
        assert enc.encode_single_token(bytes([b])) in set(tok.base_ids.tolist())
    assert tok.eot_id is not None
    assert int(tok.base_ids[tok.eot_id]) == enc.encode_single_token("<|endoftext|>")


def test_tokens_outside_vocab_are_spelled_as_bytes(tok):
    enc = tok.enc
    base = enc.encode_ordinary(CJK)
    ids = tok.encode(CJK)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert len(ids) >= len(base)
    # Europarl en/fr training text has no CJK: some of these tokens must have been spelled out
    assert len(ids) > len(base)
    assert tok.decode(ids) == CJK

    # one token outside the vocabulary becomes exactly its bytes' single-byte tokens
    kept = set(tok.base_ids.tolist())
    outside = next(t for t in base if t not in kept and len(enc.decode_single_token_bytes(t)) > 1)
    raw = enc.decode_single_token_bytes(outside)
    compact = tok.to_compact([outside]).tolist()
    assert len(compact) == len(raw)
    assert [tok.token_bytes(i) for i in compact] == [bytes([b]) for b in raw]


def test_in_vocab_tokens_map_one_to_one(tok):
    text = "Madam President, on a point of order."
    base = tok.enc.encode_ordinary(text)
    ids = tok.encode(text)
    assert len(ids) == len(base)
    assert tok.base_ids[ids].tolist() == base


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_encode_batch_matches_encode(tok):
    texts = ["Resumption of the session\n", CJK, "Reprise de la session\n", ""]
    batch = tok.encode_batch(texts, num_threads=2)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in texts]


def test_state_dict_roundtrip(tok):
    state = tok.state_dict()
    assert set(state) == {"encoding", "base_ids"}
    assert all(isinstance(i, int) for i in state["base_ids"])
    again = Tokenizer.from_state_dict(state)
    assert again.vocab_size == tok.vocab_size
    assert np.array_equal(again.base_ids, tok.base_ids)
    assert again.eot_id == tok.eot_id
    s = "Reprise de la session — 日本 🙂"
    assert again.encode(s) == tok.encode(s)


def test_bad_compact_vocab_rejected():
    with pytest.raises(UserError):
        Tokenizer("cl100k_base", [])
    with pytest.raises(UserError):
        Tokenizer("cl100k_base", [5, 3])
    with pytest.raises(UserError):  # lacks the single-byte tokens
        Tokenizer("cl100k_base", [1000, 2000])
    with pytest.raises(UserError):  # beyond the encoding
        Tokenizer("cl100k_base", list(range(256)) + [10**6])


def test_token_str_shows_partial_utf8(tok):
    enc = tok.enc
    compact = int(np.searchsorted(tok.base_ids, enc.encode_single_token(b"\xe2")))
    assert tok.token_bytes(compact) == b"\xe2"
    assert tok.token_str(compact) == "\\xe2"
    vote = tok.encode(" vote")
    assert len(vote) == 1 and tok.token_str(vote[0]) == " vote"


def test_word_ids(tok):
    assert tok.word_ids("vote") == tok.encode(" vote")
    assert tok.word_ids(" vote") == tok.encode(" vote")
    assert tok.word_ids("vote", exact=True) == tok.encode("vote")
    assert tok.word_ids("vote") != tok.encode("vote")
