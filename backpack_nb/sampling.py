"""Text samples from a checkpoint (``sample.py`` and the notebooks call the same function)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .checkpoint import load_model
from .devices import resolve_device
from .errors import UserError, exit_on_user_error
from .tokenizer import Tokenizer


def sample_text(
    model: torch.nn.Module,
    tok: Tokenizer,
    start: str = "\n",
    *,
    num_samples: int = 3,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    device: str | torch.device = "cpu",
) -> list[str]:
    """``num_samples`` continuations of ``start`` (prompt included), deterministic per seed."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    prompt = tok.encode(start) or ([tok.eot_id] if tok.eot_id is not None else [0])
    x = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k)
    finally:
        model.train(was_training)
        torch.random.set_rng_state(gen_state)
    return [tok.decode(row.tolist()) for row in out]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sample.py", description="Print text samples from a checkpoint.")
    ap.add_argument("--model_path", required=True, help="ckpt.pt or best.pt")
    ap.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    ap.add_argument("--num_samples", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or mps; without CUDA, cuda falls back to the CPU")
    ap.add_argument("--strict_device", action="store_true",
                    help="refuse to fall back to the CPU")
    args = ap.parse_args(argv)
    try:
        device, _, notes = resolve_device(args.device, strict=args.strict_device, task="sampling")
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        start = args.start
        if start.startswith("FILE:"):
            try:
                start = open(start[5:], encoding="utf-8").read()
            except OSError as exc:
                raise UserError(f"cannot read the prompt file {start[5:]}: {exc.strerror}") from exc
        model, tok, _ = load_model(args.model_path, device)
        texts = sample_text(model, tok, start, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=device)
    except UserError as exc:
        exit_on_user_error(exc)
    for i, text in enumerate(texts):
        print(f"---------- sample {i + 1}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
