"""Text samples from a checkpoint (``sample.py`` and the notebooks call the same function)."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Sequence

import torch

from . import paths
from .loading import load_model
from .devices import device_problem, resolve_device
from .errors import UserError, command
from .params import MAX_SEED
from .tokenizer import Tokenizer

# Below this a temperature divides the logits past float32's range (inf, then NaN
# probabilities); 0 already means "always the most likely token".
MIN_TEMPERATURE = 1e-6



def sampling_problems(*, num_samples: int, max_new_tokens: int, temperature: float,
                      top_k: int | None, seed: int, flag_prefix: str = "") -> list[str]:
    """What is wrong with these sampling settings, one entry per setting, each naming the
    setting (with ``flag_prefix``, ``--`` on the command line) and what is allowed."""
    def bad(name: str, allowed: str, value: object) -> str:
        return f"{flag_prefix}{name} must be {allowed}, got {value}"

    problems = []
    if num_samples < 1:
        problems.append(bad("num_samples", ">= 1", num_samples))
    if max_new_tokens < 1:
        problems.append(bad("max_new_tokens", ">= 1", max_new_tokens))
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        problems.append(bad("temperature", f"0 (always the most likely token) or a finite number "
                            f">= {MIN_TEMPERATURE:g}", temperature))
    if top_k is not None and top_k < 1:
        problems.append(bad("top_k", ">= 1", top_k))
    if not 0 <= seed <= MAX_SEED:
        problems.append(bad("seed", f"in 0..{MAX_SEED}", seed))
    return problems


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
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """``num_samples`` continuations of ``start`` (prompt included), deterministic per seed.
    A prompt longer than the model's block_size conditions the samples through its last
    block_size tokens only; ``warn`` (default: a Python warning) is told so."""
    problems = sampling_problems(num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed)
    if problems:
        raise UserError("; ".join(problems))
    prompt = tok.encode(start) or ([tok.eot_id] if tok.eot_id is not None else [0])
    note = cropped_prompt_note(len(prompt), model.config.block_size)
    if note:
        (warn or _python_warning)(note)
    x = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (B, T)
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


def cropped_prompt_note(prompt_tokens: int, block_size: int) -> str | None:
    """What to tell a user whose prompt is longer than the model's context (None if it fits):
    generation sees only the last ``block_size`` tokens, the rest is printed but unused."""
    if prompt_tokens <= block_size:
        return None
    return (f"the prompt is {prompt_tokens:,} tokens long, more than the model's block_size: "
            f"the samples continue from its last {block_size:,} tokens only (kept {block_size:,} "
            f"of {prompt_tokens:,}; the whole prompt is still printed)")


def _python_warning(message: str) -> None:
    warnings.warn(message, stacklevel=3)  # points at the caller of sample_text


def read_prompt(start: str) -> str:
    """``--start``: the text itself, or ``FILE:path`` for a UTF-8 file's contents (a relative
    path taken from the project root, like every path the commands take)."""
    if not start.startswith("FILE:"):
        return start
    given = start[len("FILE:"):]
    if not given:
        raise UserError("--start FILE: needs a path after the colon, e.g. FILE:prompt.txt")
    path = paths.resolve_in_root(given)
    if not path.exists():
        raise UserError(f"--start: {paths.missing_message(given, 'prompt file')}")
    if path.is_dir():
        raise UserError(f"--start: the prompt file {path} is a folder; give a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--start: the prompt file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"--start: cannot read the prompt file {path} "
                        f"({exc.strerror or type(exc).__name__})") from None


@command
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sample.py", description="Print text samples from a checkpoint.")
    ap.add_argument("--model_path", required=True,
                    help="ckpt.pt or best.pt (a relative path is taken from the project root)")
    ap.add_argument("--start", default="\n",
                    help="prompt text, or FILE:path to read it from a UTF-8 file (a relative "
                         "path is taken from the project root)")
    ap.add_argument("--num_samples", type=int, default=3, help="how many continuations (>= 1)")
    ap.add_argument("--max_new_tokens", type=int, default=100,
                    help="tokens added to the prompt in each (>= 1)")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help=f"0 (always the most likely token) or >= {MIN_TEMPERATURE:g}")
    ap.add_argument("--top_k", type=int, default=200, help="sample among the k most likely, >= 1")
    ap.add_argument("--seed", type=int, default=1337,
                    help=f"0..{MAX_SEED}; the same seed gives the same samples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or mps; without CUDA, cuda falls back to the CPU")
    ap.add_argument("--strict_device", action="store_true",
                    help="refuse to fall back to the CPU")
    args = ap.parse_args(argv)
    # every bad value at once, before the checkpoint is read
    problems = sampling_problems(
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, flag_prefix="--")
    if device_problem(args.device):
        problems.append(f"--{device_problem(args.device)}")
    if problems:
        raise UserError("; ".join(problems))
    device, _, notes = resolve_device(args.device, strict=args.strict_device, task="sampling")
    for note in notes:
        _warning_line(note)
    start = read_prompt(args.start)
    model, tok, _ = load_model(args.model_path, device)
    texts = sample_text(model, tok, start, num_samples=args.num_samples,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed, device=device, warn=_warning_line)
    for i, text in enumerate(texts):
        print(f"---------- sample {i + 1}\n{text}")
    return 0


def _warning_line(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
