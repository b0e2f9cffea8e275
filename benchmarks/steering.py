"""The steering protocols at the released model's shape: time and peak memory.

    python -m benchmarks.steering gender [--threads N] [--no-projection]
    python -m benchmarks.steering topic [--threads N] [--chunk N] [--device cpu]

A Backpack of the released ``stanfordnlp/backpack-gpt2`` shape (12 layers, 768 wide, 12 heads,
16 senses, vocabulary 50,264, block 512), random weights (the cost does not depend on them),
float32. ``gender``: the whole protocol (40 nouns, 5 fitting and 13 test prompts, Remove and
Optimize on sense 10, and the projection control unless ``--no-projection``) with cl100k
through a 50,264-token vocabulary that holds every noun (offline; GPT-2's BPE is not here).
``topic``: the sense scores of all 50,264 x 16 senses against a bag, V k d V multiply-adds
(about 62 TFLOP) for the maxima of E C(x)_l, chunk by chunk. Peak memory is the process's
``ru_maxrss`` (what ``/usr/bin/time -v`` reports).
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import torch

from backpack_nb.errors import command
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.steering.gender import load_set, run_gender
from backpack_nb.steering.topic import bands, sense_scores
from backpack_nb.tokenizer import Tokenizer, build_compact_vocab, get_encoding

from benchmarks.common import timed

RELEASED = dict(vocab_size=50_264, block_size=512, n_layer=12, n_head=12, n_embd=768,
                n_senses=16, sense_source="network", dropout=0.0)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def released_vocabulary() -> Tokenizer:
    """cl100k through 50,264 ids: the gender set's tokens, the bytes, then the lowest ids."""
    enc = get_encoding("cl100k_base")
    gset = load_set("gender_en")
    texts = [p.format(noun=n) for n in gset.nouns for p in gset.fitting + gset.test] + [" he she they"]
    needed = build_compact_vocab(enc, [enc.encode_ordinary(t) for t in texts])
    rest = np.setdiff1d(np.arange(enc.n_vocab), needed)[: RELEASED["vocab_size"] - len(needed)]
    return Tokenizer("cl100k_base", np.union1d(needed, rest))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.steering", description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=["gender", "topic"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--chunk", type=int, default=None, help="topic: tokens per chunk (default: ~256 MB)")
    ap.add_argument("--no-projection", action="store_true", dest="no_projection",
                    help="gender: Remove and Optimize only")
    ap.add_argument("--device", default="cpu")
    return ap


def measure(model, args: argparse.Namespace) -> str:
    """Run the protocol ``args`` names on ``model``; what it did, in a line."""
    if args.experiment == "gender":
        result = run_gender(model, released_vocabulary(), "gender_en", sense=10,
                            projection=not args.no_projection)
        return (f"gender protocol, {len(result['nouns'])} nouns ({len(result['skipped'])} skipped), "
                + ("Remove, Optimize" + ("" if args.no_projection else ", Project, Project-Optimize")))
    scores = sense_scores(model, [100, 200, 300], chunk=args.chunk)
    c = model.config
    flop = 2 * c.vocab_size * c.n_senses * c.n_embd * c.vocab_size
    thresholds, _ = bands(scores)
    return (f"sense_scores {tuple(scores.shape)}, {flop / 1e12:.1f} TFLOP; thresholds "
            + ", ".join(f"q{q:g} {v:.4f}" for q, v in thresholds.items()))


@command
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("backpack", ModelConfig(**RELEASED)).to(args.device).eval()
    print(f"model built: peak RSS {peak_rss_mib():,.0f} MiB, {torch.get_num_threads()} threads")
    seconds, what = timed(lambda: measure(model, args), args.device)
    print(f"{what}: {seconds:,.1f} s; peak RSS {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
