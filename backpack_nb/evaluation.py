"""Held-out loss, perplexity and bits per byte, overall and per language.

Bits per byte is the number to compare across tokenizers and languages: the total negative
log-likelihood of a text in nats, divided by ln 2 and by the text's UTF-8 bytes. A token's
bytes are its tiktoken bytes; ``<|endoftext|>`` separators count as zero bytes (they are not
text) but their prediction still costs nats, as it would for any model of this data.

The text is cut into windows of ``block_size`` predictions. By default the windows do not
overlap (stride = block_size); a smaller ``stride`` gives each scored token more context, the
sliding-window evaluation: every window after the first scores only its last ``stride``
tokens. Scores are kept per window, so a bootstrap over windows gives a 95% interval.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import data, dataset, lexsim, paths, stats
from .loading import load_model
from .eval_json import eval_json_path, merge_eval_json
from .console import progress_bar
from .devices import DTYPES, autocast_dtype, device_problem, resolve_device
from .errors import UserError, command
from .params import load_params
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of each compact token; special tokens count 0 (they are not text)."""
    lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
    lengths[list(tok.special_ids.values())] = 0
    return lengths


@dataclass
class WindowScores:
    """Per-window totals of one evaluated token sequence."""

    nats: np.ndarray  # (n_windows,) summed negative log-likelihood
    tokens: np.ndarray  # (n_windows,) scored tokens
    bytes: np.ndarray  # (n_windows,) UTF-8 bytes of the scored tokens

    @staticmethod
    def concat(parts: list["WindowScores"]) -> "WindowScores":
        return WindowScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nats", "tokens", "bytes")))

    def summary(self, n_boot: int = 1000, seed: int = 0) -> dict:
        """loss (nats/token), ppl, bits_per_byte with a bootstrap 95% interval over windows."""
        nats, toks, nbytes = self.nats.sum(), self.tokens.sum(), self.bytes.sum()
        loss = float(nats / toks) if toks else float("nan")
        bpb = stats.ratio(self.nats, self.bytes, unit=math.log(2))
        ci = stats.bootstrap_ratio(self.nats, self.bytes, n_boot, seed, unit=math.log(2))
        return {
            "loss": loss,
            "ppl": float(math.exp(loss)) if toks else float("nan"),
            "bits_per_byte": bpb,
            "bpb_ci95": ci,
            "tokens": int(toks),
            "bytes": int(nbytes),
            "windows": int(len(self.nats)),
        }


def windows(n_tokens: int, block_size: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, length, first_scored) of each window over a sequence of ``n_tokens``: inputs
    ``[start, start + length)`` predict the tokens one position later; predictions at index
    ``>= first_scored`` within the window are scored. Every token after the first is scored
    exactly once."""
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    n_pred = n_tokens - 1
    out: list[tuple[int, int, int]] = []
    if n_pred <= 0:
        return out
    out.append((0, min(block_size, n_pred), 0))
    scored_to = out[0][1]  # predictions [0, scored_to) done
    while scored_to < n_pred:
        end = min(scored_to + stride, n_pred)  # score predictions [scored_to, end)
        start = max(0, end - block_size)
        out.append((start, end - start, scored_to - start))
        scored_to = end
    return out


# The held-out splits, the ones with a token file per language. The training split is not
# offered: its loss is in training_log.json (train_loss, at every evaluation), it has no
# per-language files, and on the full corpus it is hundreds of times larger than val.
SPLITS = ("val", "test")


def split_problems(splits: Sequence[str], flag_prefix: str = "") -> list[str]:
    """What is wrong with a list of split names (empty, unknown, ``train``), checked before
    any split is scored, so that ``val,train`` never scores val and then fails."""
    flag, names = f"{flag_prefix}splits", ", ".join(SPLITS)
    if not splits:
        return [f"{flag} is empty; give comma-separated names from {names}"]
    problems = []
    if "train" in splits:
        problems.append(f"{flag}: train is not evaluated (no per-language token files; its "
                        "loss is train_loss in the run's training_log.json, at every "
                        f"evaluation); use {names}")
    bad = [s for s in splits if s not in SPLITS and s != "train"]
    if bad:
        problems.append(f"{flag}: unknown split(s) {', '.join(bad)}; use comma-separated "
                        f"names from {names}")
    return problems


def min_tokens(block_size: int) -> int:
    """The fewest tokens a cap (``max_tokens``) may leave: one window of ``block_size``
    predictions needs ``block_size + 1`` tokens, and the bootstrap interval a second window
    (which scores at least one more prediction)."""
    return block_size + 2


def window_problems(block_size: int, stride: int | None, max_tokens: int | None,
                    flag_prefix: str = "") -> list[str]:
    """What is wrong with ``stride`` and ``max_tokens`` for a model of ``block_size``; each
    entry names the setting (``flag_prefix`` + name) and what is allowed."""
    problems = []
    if stride is not None and not 0 < stride <= block_size:
        problems.append(f"{flag_prefix}stride must be in 1..{block_size} (the model's "
                        f"block_size), got {stride}")
    if max_tokens is not None and max_tokens < min_tokens(block_size):
        problems.append(
            f"{flag_prefix}max_tokens {max_tokens} is too few: one window of the model's "
            f"block_size ({block_size}) takes {block_size + 1} tokens and a 95% interval needs "
            f"a second window, so give at least {min_tokens(block_size)} (or leave it out to "
            "score everything)")
    return problems


def _token_nll(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T) in float32, the logits made chunk by chunk."""
    h = model.hidden_states(idx)  # (B, T, d)
    E = model.wte.weight  # (V, d)
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat_t.shape, dtype=torch.float32, device=idx.device)
    for s in range(0, flat_h.shape[0], chunk_rows):
        logits = (flat_h[s : s + chunk_rows] @ E.T).float()  # (rows, V)
        out[s : s + chunk_rows] = torch.logsumexp(logits, -1) - logits.gather(1, flat_t[s : s + chunk_rows, None])[:, 0]
    return out.view(targets.shape)


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    byte_lengths: np.ndarray,
    *,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> WindowScores:
    """Score a token sequence (``max_tokens`` caps it) window by window; deterministic."""
    was_training = model.training
    model.eval()
    tokens = np.asarray(tokens[: max_tokens if max_tokens else len(tokens)], dtype=np.int64)
    wins = windows(len(tokens), block_size, stride)
    nats = np.zeros(len(wins))
    counts = np.zeros(len(wins), dtype=np.int64)
    nbytes = np.zeros(len(wins), dtype=np.int64)
    device = torch.device(device)
    # Equal-length windows batch together (all but possibly the first and last).
    groups: dict[int, list[int]] = {}
    for w, (_, length, _) in enumerate(wins):
        groups.setdefault(length, []).append(w)
    bar = progress_bar(len(wins), desc, "windows", progress)
    try:
        for length, members in groups.items():
            for b in range(0, len(members), batch_size):
                batch = members[b : b + batch_size]
                x = np.stack([tokens[wins[w][0] : wins[w][0] + length] for w in batch])
                y = np.stack([tokens[wins[w][0] + 1 : wins[w][0] + length + 1] for w in batch])
                xt = torch.from_numpy(x).to(device)
                yt = torch.from_numpy(y).to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    nll = _token_nll(model, xt, yt).double().cpu().numpy()  # (b, length)
                for row, w in enumerate(batch):
                    first = wins[w][2]
                    nats[w] = nll[row, first:].sum()
                    counts[w] = length - first
                    nbytes[w] = byte_lengths[y[row, first:]].sum()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return WindowScores(nats, counts, nbytes)


# ----------------------------------------------------------------------------------------
# evaluating a checkpoint


def evaluate_model(
    model: torch.nn.Module,
    tok: Tokenizer,
    data_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("val", "test"),
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    n_boot: int = 1000,
    progress: bool = True,
) -> dict:
    """``{"val": {"all": {...}, "en": {...}, ...}, "test": {...}}``; each language's file is
    scored separately and "all" pools their windows (``max_tokens`` caps each language)."""
    problems = split_problems(splits) + window_problems(model.config.block_size, stride,
                                                         max_tokens)
    if problems:
        raise UserError("; ".join(problems))
    meta = dataset.load_meta(data_dir)
    lengths = token_byte_lengths(tok)
    out: dict[str, dict] = {}
    for split in splits:
        parts, per_lang = [], {}
        for lang in meta["langs"]:
            toks = dataset.load_tokens(data_dir, split, lang)
            dataset.check_token_ids(toks, tok.vocab_size,
                                 dataset.resolve_data_dir(data_dir) / f"{split}_{lang}.bin")
            scores = score_tokens(
                model, toks, lengths, block_size=model.config.block_size, stride=stride,
                batch_size=batch_size, max_tokens=max_tokens, device=device,
                autocast_dtype=autocast_dtype, desc=f"{split} {lang}", progress=progress,
            )
            if not len(scores.nats):  # a file cut short: no window, so no number to give
                raise UserError(
                    f"{dataset.resolve_data_dir(data_dir) / f'{split}_{lang}.bin'} holds "
                    f"{len(toks)} token(s), too few to score (at least 2); prepare the dataset "
                    "again, or leave this split out")
            per_lang[lang] = scores.summary(n_boot)
            parts.append(scores)
        out[split] = {"all": WindowScores.concat(parts).summary(n_boot), **per_lang}
    return out


def format_table(result: dict) -> str:
    lines = [f"{'split':<6}{'lang':<6}{'loss':>8}{'ppl':>10}{'bits/byte':>11}{'95% interval':>20}{'tokens':>10}{'bytes':>11}"]
    for split, langs in result["splits"].items():
        for lang, r in langs.items():
            lo, hi = r["bpb_ci95"]
            # one window (a held-out file shorter than two): no interval to show
            ci = f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "n/a"
            lines.append(f"{split:<6}{lang:<6}{r['loss']:>8.4f}{r['ppl']:>10.2f}{r['bits_per_byte']:>11.4f}{ci:>20}{r['tokens']:>10,}{r['bytes']:>11,}")
    return "\n".join(lines)


def evaluate_checkpoint(
    model_path: str | os.PathLike,
    *,
    config: str | None = None,
    model_type: str | None = None,
    data_dir: str | None = None,
    splits: Sequence[str] = ("val", "test"),
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    strict_device: bool = False,
    flag_prefix: str = "",
) -> dict:
    """Evaluate a checkpoint and write ``eval.json`` beside it (other sections of an
    existing ``eval.json`` of the same checkpoint, such as ``lexsim``, are kept).

    ``config`` (a params name) supplies the data settings only; without it, the data the
    checkpoint was trained on. Bad settings are refused before anything is prepared or
    written; their messages name them with ``flag_prefix`` (``--`` for evaluate.py)."""
    problems = split_problems(splits, flag_prefix)
    if problems:  # before the checkpoint is read, and before any split is scored
        raise UserError("; ".join(problems))
    device, dtype, notes = resolve_device(str(device), dtype, strict=strict_device,
                                          task="evaluation")
    for note in notes:
        log.warning(note)
    target = eval_json_path(out, flag_prefix) if out else None
    model, tok, state = load_model(model_path, device, model_type)
    model_path = paths.resolve_in_root(model_path)
    problems = window_problems(model.config.block_size, stride, max_tokens, flag_prefix)
    if problems:  # before a dataset is prepared for nothing
        raise UserError("; ".join(problems))
    if config is not None:
        cfg = load_params(config)
        if data_dir is not None and str(data_dir) != cfg.data_dir:
            # only the params file's own dataset is prepared on first use: another name that
            # does not exist is a typo, not a new dataset to prepare (and download)
            dataset.require_existing(str(data_dir), flag=f"{flag_prefix}data_dir",
                                     prepare_args=dataset.prepare_args(cfg))
        ddir = data.ensure_prepared(
            data_dir or cfg.data_dir, source=cfg.data_source or None, langs=cfg.languages,
            form=cfg.data_form, block_size=model.config.block_size, seed=cfg.seed,
            encoding=cfg.encoding, progress=progress,
        )
    else:
        ddir = dataset.resolve_data_dir(data_dir or state.get("data", {}).get("data_dir", "europarl"))
    meta = dataset.load_meta(ddir)
    dataset.check_same_vocabulary(tok, meta, ddir, model_path)
    autocast = autocast_dtype(dtype)
    result = {
        "model_type": state["model_type"],
        "checkpoint": str(model_path),
        "iteration": int(state.get("iter_num", 0)),
        "data_dir": str(ddir),
        "stride": stride or model.config.block_size,
        "max_tokens": max_tokens,
        "splits": evaluate_model(
            model, tok, ddir, splits=splits, stride=stride, batch_size=batch_size,
            max_tokens=max_tokens, device=device, autocast_dtype=autocast, progress=progress,
        ),
    }
    target = target or model_path.parent / "eval.json"
    check_finite_scores(result["splits"], dtype, flag_prefix)  # never over a good eval.json
    merge_eval_json(target, model_path, result, flag_prefix)
    result["path"] = str(target)
    return result


def check_finite_scores(splits: dict, dtype: str, flag_prefix: str = "") -> None:
    """A UserError when a score is NaN or infinite (finite weights, checked on load, can still
    overflow in float16), so that no eval.json is written with it."""
    bad = [f"{split} {lang}" for split, langs in splits.items() for lang, r in langs.items()
           if not math.isfinite(r["loss"])]
    if bad:
        hint = (f"evaluate with {flag_prefix}dtype bfloat16 or float32 (float16 overflows)"
                if dtype == "float16" else "check the checkpoint with sample.py")
        raise UserError(f"the loss is NaN or infinite on {', '.join(bad)}, so nothing was "
                        f"written (an existing eval.json is left as it was); {hint}")


def _check_args(args: argparse.Namespace) -> list[str]:
    """Every problem with evaluate.py's values in one UserError, before the checkpoint is
    read (the ones that need the model's block_size wait for it); returns the splits."""
    problems = [f"--{name} must be >= 1, got {value}" for name, value in
                (("batch_size", args.batch_size), ("stride", args.stride),
                 ("max_tokens", args.max_tokens)) if value is not None and value < 1]
    if device_problem(args.device):
        problems.append(f"--{device_problem(args.device)}")
    splits = list(dict.fromkeys(s.strip() for s in args.splits.split(",") if s.strip()))
    problems += split_problems(splits, "--")
    if problems:
        raise UserError("; ".join(problems))
    return splits


@command
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a checkpoint: loss, perplexity, bits per byte per language.")
    ap.add_argument("--model_path", required=True,
                    help="ckpt.pt or best.pt (a relative path is taken from the project root)")
    ap.add_argument("--config", default=None, help="params name for the data settings (the model's shape comes from the checkpoint)")
    ap.add_argument("--model_type", default=None, choices=["backpack", "transformer"], help="must match the checkpoint")
    ap.add_argument("--data_dir", default=None, help="override the dataset")
    ap.add_argument("--splits", default="val,test",
                    help="comma-separated held-out splits: val, test (the training loss is in "
                         "the run's training_log.json)")
    ap.add_argument("--max_tokens", type=int, default=None,
                    help="evaluate at most this many tokens per language and split "
                         "(at least the model's block_size + 2: two windows)")
    ap.add_argument("--stride", type=int, default=None, help="window stride (default block_size: non-overlapping)")
    ap.add_argument("--batch_size", type=int, default=8, help="windows scored at once, >= 1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or mps; without CUDA, cuda falls back to the CPU")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="float16 on a CPU runs in float32")
    ap.add_argument("--strict_device", action="store_true",
                    help="refuse to fall back to the CPU (or to another dtype)")
    ap.add_argument("--out", default=None,
                    help="where to write the JSON (default: eval.json beside the checkpoint); "
                         "an existing file is replaced only if it is an evaluation")
    ap.add_argument("--lexsim", action="store_true", help="also score Multi-SimLex word similarity (a lexsim section in eval.json)")
    ap.add_argument("--multisimlex", default=None, metavar="PATH",
                    help="folder with Multi-SimLex's scores.csv and translation.csv (default: MULTISIMLEX_SOURCE, else data/multisimlex)")
    args = ap.parse_args(argv)
    splits = _check_args(args)
    if args.lexsim:  # read Multi-SimLex first: a bad file fails before anything is written
        bench = lexsim.load_multisimlex(args.multisimlex)
    # the device rule once, for both scores (one warning, not one per score)
    device, dtype, notes = resolve_device(args.device, args.dtype, strict=args.strict_device,
                                          task="evaluation")
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    result = evaluate_checkpoint(
        args.model_path, config=args.config, model_type=args.model_type, data_dir=args.data_dir,
        splits=splits, stride=args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens,
        device=str(device), dtype=dtype, out=args.out, flag_prefix="--",
    )
    if args.lexsim:
        result["lexsim"] = lexsim.write_lexsim(result["checkpoint"], bench, data_dir=result["data_dir"],
                                               out=result["path"], device=str(device))
    print(f"{result['model_type']} at iteration {result['iteration']} ({result['checkpoint']})")
    print(format_table(result))
    if "lexsim" in result:
        print(lexsim.format_table(result["lexsim"]))
    print(f"wrote {result['path']}")
    return 0
