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
from .devices import DTYPES, autocast, device_problem, resolve_device
from .errors import UserError, command
from .models.generation import Intervention, decode
from .params import MAX_SEED
from .tokenizer import Tokenizer

# Below this a temperature divides the logits past float32's range (inf, then NaN
# probabilities); 0 already means "always the most likely token".
MIN_TEMPERATURE = 1e-6



def sampling_problems(*, num_samples: int, max_new_tokens: int, temperature: float,
                      top_k: int | None, seed: int, top_p: float = 1.0,
                      stop: Sequence[str] = (), flag_prefix: str = "") -> list[str]:
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
    if not 0 < top_p <= 1:  # NaN too
        problems.append(bad("top_p", "in (0, 1] (1 keeps every token)", top_p))
    if not 0 <= seed <= MAX_SEED:
        problems.append(bad("seed", f"in 0..{MAX_SEED}", seed))
    if isinstance(stop, str):
        problems.append(bad("stop", "a list of texts", repr(stop)))
    elif not all(isinstance(s, str) and s for s in stop):
        problems.append(bad("stop", "non-empty text", ", ".join(map(repr, stop))))
    return problems


def sample_text(
    model: torch.nn.Module,
    tok: Tokenizer,
    start: str | Sequence[str] = "\n",
    *,
    num_samples: int = 3,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float = 1.0,
    seed: int = 1337,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    stop_at_eot: bool = False,
    stop: Sequence[str] = (),
    intervention: Intervention | None = None,
    use_cache: bool = True,
    compile: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """``num_samples`` continuations of ``start`` (prompt included), deterministic per seed;
    with several starts (a list), ``num_samples`` of each, in the order of the starts, drawn
    in one batch (each row continues its own prompt exactly as it would alone).

    ``temperature``, ``top_k`` and ``top_p``: :func:`~backpack_nb.models.generation.next_tokens`.
    A sample ends after ``max_new_tokens`` tokens (any number: the model sees its last
    ``block_size``), or earlier with ``stop_at_eot`` at the end-of-text token (left out of
    the text) or just after the first of the ``stop`` texts it writes (kept). ``dtype``:
    autocast (float16 on a CPU runs in float32). ``intervention``: a Backpack's steering
    (:class:`~backpack_nb.models.generation.Intervention`). ``use_cache=False`` recomputes
    the whole context for every token (the reference); ``compile`` compiles the cached step
    (:func:`~backpack_nb.models.generation.compiled`). A prompt longer than the model's
    block_size conditions the samples through its last block_size tokens only; ``warn``
    (default: a Python warning) is told so, and of a dtype fallback."""
    starts = [start] if isinstance(start, str) else list(start)
    problems = sampling_problems(num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed, top_p=top_p,
                                 stop=stop)
    if not starts or not all(isinstance(s, str) for s in starts):
        problems.append(f"start must be a text or a non-empty list of texts, got {start!r}")
    if stop_at_eot and tok.eot_id is None:
        problems.append("stop_at_eot: this tokenizer has no end-of-text token")
    if problems:
        raise UserError("; ".join(problems))
    say = warn or _python_warning
    device, dtype, notes = resolve_device(str(device), dtype, task="sampling")
    prompts = [tok.encode(s) or [tok.eot_id if tok.eot_id is not None else 0] for s in starts]
    notes += [n for p in prompts if (n := cropped_prompt_note(len(p), model.config.block_size))]
    for note in notes:
        say(note)
    rows = [p for p in prompts for _ in range(num_samples)]
    width = max(map(len, rows))
    first = [width - len(p) for p in rows]  # left padding: every prompt ends at one column
    ids = torch.tensor([[0] * f + p for f, p in zip(first, rows)], dtype=torch.long,
                       device=device)  # (B, width)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, dtype):
            out, ends = decode(
                model, ids, max_new_tokens, starts=first, temperature=temperature, top_k=top_k,
                top_p=top_p, generator=torch.Generator(device=device).manual_seed(seed),
                use_cache=use_cache, intervention=intervention, compile=compile,
                until=stop_condition(tok, width, tok.eot_id if stop_at_eot else None, stop))
    finally:
        model.train(was_training)
    eot = tok.eot_id if stop_at_eot else None
    return [finished_text(tok, row[f:end].tolist(), width - f, eot, stop)
            for row, f, end in zip(out, first, ends)]


def stop_condition(tok: Tokenizer, prompt_width: int, eot_id: int | None,
                   stop: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """generation's ``until`` for rows whose prompts fill the first ``prompt_width`` columns:
    rows whose newest token is ``eot_id`` or whose generated text now holds one of ``stop``
    (None when neither is asked for)."""
    if eot_id is None and not stop:
        return None
    wanted = [s.encode("utf-8") for s in stop]
    tail = max(map(len, wanted), default=0)  # a token is at least one byte

    def until(ids: torch.Tensor) -> torch.Tensor:
        done = torch.zeros(len(ids), dtype=torch.bool)
        if eot_id is not None:
            done |= (ids[:, -1] == eot_id).cpu()
        if wanted:
            recent = ids[:, max(prompt_width, ids.shape[1] - tail):].tolist()
            for b, row in enumerate(recent):
                text = tok.decode_bytes(row)
                done[b] |= any(s in text for s in wanted)
        return done

    return until


def finished_text(tok: Tokenizer, ids: list[int], prompt_len: int, eot_id: int | None,
                  stop: Sequence[str]) -> str:
    """A sample's text: the prompt and what was generated, up to the end-of-text token (left
    out) or just after the first stop text (kept)."""
    generated = ids[prompt_len:]
    if eot_id is not None and eot_id in generated:
        generated = generated[: generated.index(eot_id)]
    data = tok.decode_bytes(ids[:prompt_len] + generated)
    head = len(tok.decode_bytes(ids[:prompt_len]))
    ends = [at + len(s) for s in (s.encode("utf-8") for s in stop)
            if (at := data.find(s, head)) >= 0]
    return data[: min(ends, default=len(data))].decode("utf-8", errors="replace")


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
    ap.add_argument("--start", action="append", default=None,
                    help="prompt text, or FILE:path to read it from a UTF-8 file (a relative "
                         "path is taken from the project root); give it several times for "
                         "several prompts, each getting --num_samples samples (default: a "
                         "newline)")
    ap.add_argument("--num_samples", type=int, default=3,
                    help="how many continuations of each start (>= 1)")
    ap.add_argument("--max_new_tokens", type=int, default=100,
                    help="tokens added to the prompt in each (>= 1; may exceed the model's "
                         "block_size)")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help=f"0 (always the most likely token) or >= {MIN_TEMPERATURE:g}")
    ap.add_argument("--top_k", type=int, default=200, help="sample among the k most likely, >= 1")
    ap.add_argument("--top_p", type=float, default=1.0,
                    help="nucleus sampling: among the smallest set of the most likely tokens "
                         "whose probability reaches p, in (0, 1] (default 1: all)")
    ap.add_argument("--stop_at_eot", action="store_true",
                    help="end a sample at the end-of-text token (not printed)")
    ap.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="end a sample just after this text (printed); give it several times "
                         "for several")
    ap.add_argument("--seed", type=int, default=1337,
                    help=f"0..{MAX_SEED}; the same seed gives the same samples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or mps; without CUDA, cuda falls back to the CPU")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="autocast precision; float16 on a CPU runs in float32")
    ap.add_argument("--strict_device", action="store_true",
                    help="refuse to fall back to the CPU (or to another dtype)")
    ap.add_argument("--compile", action="store_true",
                    help="compile the decoding step with torch.compile: a one-time cost (tens of "
                         "seconds on a CPU), then no recompiling per token")
    args = ap.parse_args(argv)
    # every bad value at once, before the checkpoint is read
    problems = sampling_problems(
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, top_p=args.top_p,
        stop=args.stop, flag_prefix="--")
    if device_problem(args.device):
        problems.append(f"--{device_problem(args.device)}")
    if problems:
        raise UserError("; ".join(problems))
    device, dtype, notes = resolve_device(args.device, args.dtype, strict=args.strict_device,
                                          task="sampling")
    for note in notes:
        _warning_line(note)
    starts = [read_prompt(start) for start in args.start or ["\n"]]
    model, tok, _ = load_model(args.model_path, device)
    texts = sample_text(model, tok, starts, num_samples=args.num_samples,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=device,
                        dtype=dtype, stop_at_eot=args.stop_at_eot, stop=args.stop,
                        compile=args.compile, warn=_warning_line)
    for i, text in enumerate(texts):
        which = f" (start {i // args.num_samples + 1})" if len(starts) > 1 else ""
        print(f"---------- sample {i + 1}{which}\n{text}")
    return 0


def _warning_line(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
