"""Topic control's sense scores over the released model's vocabulary: time and peak memory.

    /usr/bin/time -v python -m benchmarks.steering_topic [--threads N] [--chunk N] [--device cpu]

A Backpack of the released ``stanfordnlp/backpack-gpt2`` shape (12 layers, 768 wide, 12 heads,
16 senses, vocabulary 50,264, block 512), random weights (the cost does not depend on them),
float32. :func:`backpack_nb.steering.topic.sense_scores` scores all 50,264 x 16 senses against
a bag of three tokens: V k d V multiply-adds (about 62 TFLOP) for the maxima of E C(x)_l, done
chunk by chunk (about 256 MB of sense logits each). Prints the time, the FLOP rate and the
peak resident memory of the process (``ru_maxrss``; ``/usr/bin/time -v`` reports the same).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from backpack_nb.errors import command
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.steering.topic import bands, sense_scores

from benchmarks.common import sync

RELEASED = dict(vocab_size=50_264, block_size=512, n_layer=12, n_head=12, n_embd=768,
                n_senses=16, sense_source="network", dropout=0.0)


def released_backpack(device: str) -> torch.nn.Module:
    """A random Backpack of the released model's shape, in eval mode."""
    torch.manual_seed(0)
    return build_model("backpack", ModelConfig(**RELEASED)).to(device).eval()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: ~256 MB)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = released_backpack(args.device)
    print(f"model built: peak RSS {peak_rss_mib():,.0f} MiB, {torch.get_num_threads()} threads")
    c = model.config
    sync(args.device)
    t0 = time.perf_counter()
    scores = sense_scores(model, [100, 200, 300], chunk=args.chunk)
    sync(args.device)
    seconds = time.perf_counter() - t0
    flop = 2 * c.vocab_size * c.n_senses * c.n_embd * c.vocab_size
    thresholds, _ = bands(scores)
    print(f"sense_scores {tuple(scores.shape)}: {seconds:,.1f} s, {flop / seconds / 1e9:,.0f} GFLOP/s "
          f"({flop / 1e12:.1f} TFLOP); peak RSS {peak_rss_mib():,.0f} MiB; thresholds "
          + ", ".join(f"q{q:g} {v:.4f}" for q, v in thresholds.items()))


if __name__ == "__main__":
    main()
