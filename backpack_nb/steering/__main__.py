"""``python -m backpack_nb.steering gender|topic|edit --model_path ...``: the paper's three
interventions on a run's checkpoint, ``hf:<id>`` or a pretrained folder, written as the
``steering`` section (``gender``, ``topic``, ``edit`` inside) of the checkpoint's eval.json,
keeping every section already there, or to ``--out FILE`` (required for a pretrained model,
which has no run folder). docs/steering.md has the protocols, commands and costs."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import paths
from ..devices import resolve_device
from ..errors import UserError, command
from ..eval_json import eval_json_path
from ..loading import load_model
from ..model_source import is_pretrained
from ..params import MAX_SEED
from .edit import load_edit, run_edit
from .gender import check_sense, load_set, run_gender
from .report import gender_key, run_tokens, summary, write_steering
from .topic import run_topic

log = logging.getLogger(__name__)

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m backpack_nb.steering", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="experiment", required=True, metavar="gender|topic|edit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model_path", required=True,
                        help="ckpt.pt or best.pt of a run, hf:<repo id>, or a pretrained folder")
    common.add_argument("--device", default="cpu")
    common.add_argument("--out", default=None,
                        help="eval.json to update (default: beside the checkpoint; required for a "
                             "pretrained model); an existing file is replaced only if it is an evaluation")
    common.add_argument("--compare-paper", action="store_true", dest="compare_paper",
                        help="print the paper's numbers beside the measured ones")
    common.add_argument("--no-progress", action="store_true", dest="no_progress")

    g = sub.add_parser("gender", parents=[common], help="gender bias: Remove, Optimize, projection (paper §6.2)")
    g.add_argument("--nouns", default="gender_en",
                   help="nouns, prompts and pronouns: gender_en (the paper's), gender_fr, or a YAML file")
    g.add_argument("--sense", type=int, default=None,
                   help="the gender sense (10 for the released model); default: found (see docs)")
    g.add_argument("--single_token", action="store_true",
                   help="only nouns that are one token, as the authors did")

    t = sub.add_parser("topic", parents=[common], help="topic control by annealed sense weights (paper §6.1)")
    t.add_argument("--bags", default="topics_europarl",
                   help="topic bags: topics_europarl, topics_paper (the paper's 17), or a YAML file")
    t.add_argument("--topics", default=None, help="comma-separated bag names (default: all)")
    t.add_argument("--strengths", default="0,1,2,3", help="comma-separated strengths in 0..3")
    t.add_argument("--samples", type=int, default=8, help="samples per topic and strength (paper: 500)")
    t.add_argument("--tokens", type=int, default=40, help="tokens per sample (paper: 100)")
    t.add_argument("--prompt", default=None,
                   help="text to continue (default: unconditional, from the end-of-text token)")
    t.add_argument("--batch_size", type=int, default=8)
    t.add_argument("--seed", type=int, default=1337)

    e = sub.add_parser("edit", parents=[common], help="knowledge editing of one word (paper §6.3)")
    e.add_argument("--edit", default=None,
                   help="a named edit of --edits (default: europarl for a model trained here, "
                        "macbook for a pretrained one)")
    e.add_argument("--edits", default="edits", help="edits file: edits (shipped) or a YAML file")
    e.add_argument("--heldout_tokens", type=int, default=20000,
                   help="held-out tokens (the run's val split) for the loss before and after; 0: none")
    e.add_argument("--heldout", default=None, metavar="TEXT_FILE",
                   help="held-out text instead of the run's val split (for a pretrained model)")
    return ap


def _split(text: str, flag: str, kind=str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UserError(f"{flag} is empty; give a comma-separated list")
    try:
        return [kind(s) for s in items]
    except ValueError:
        raise UserError(f"{flag} {text!r}: a comma-separated list of {kind.__name__}s") from None


def check_args(args: argparse.Namespace) -> None:
    """Every bad value in one UserError, before the model loads."""
    problems = []
    if args.experiment == "topic":
        strengths = _split(args.strengths, "--strengths", int)
        if any(s not in (0, 1, 2, 3) for s in strengths):
            problems.append(f"--strengths {args.strengths}: each in 0..3")
        args.strengths = strengths
        args.topics = _split(args.topics, "--topics") if args.topics is not None else None
        for flag, value in (("--samples", args.samples), ("--tokens", args.tokens),
                            ("--batch_size", args.batch_size)):
            if value < 1:
                problems.append(f"{flag} must be >= 1, got {value}")
        if not 0 <= args.seed <= MAX_SEED:
            problems.append(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.experiment == "gender" and args.sense is not None and args.sense < 0:
        problems.append(f"--sense {args.sense}: a sense number, 0 or more")
    if args.experiment == "edit":
        if args.heldout_tokens < 0:
            problems.append(f"--heldout_tokens must be >= 0, got {args.heldout_tokens}")
        if args.heldout is not None and not Path(args.heldout).is_file():
            problems.append(f"--heldout {args.heldout}: no such file")
    if args.out is None and is_pretrained(args.model_path):
        problems.append(f"--out is required for {args.model_path} (a pretrained model has no run "
                        "folder to write eval.json into), e.g. --out out/steering.json")
    if problems:
        raise UserError("; ".join(problems))


def _heldout(args, state: dict, tok) -> np.ndarray | None:
    if args.heldout is not None:
        return np.asarray(tok.encode(Path(args.heldout).read_text(encoding="utf-8")))
    if args.heldout_tokens == 0:
        return None
    tokens = run_tokens(state, "val", "the held-out loss", "; give --heldout TEXT_FILE")
    return None if tokens is None else np.asarray(tokens[: args.heldout_tokens + 1])


def run(args: argparse.Namespace, model, tok, state: dict) -> dict:
    progress = not args.no_progress
    if args.experiment == "gender":
        load_set(args.nouns)  # a bad --nouns or --sense before the training tokens are read
        check_sense(model, args.sense)
        return run_gender(model, tok, args.nouns, sense=args.sense, single_token=args.single_token,
                          train_tokens=run_tokens(state, "train", "pronoun counts"), progress=progress)
    if args.experiment == "topic":
        return run_topic(model, tok, bags=args.bags, topics=args.topics, strengths=args.strengths,
                         n_samples=args.samples, max_new_tokens=args.tokens, prompt=args.prompt,
                         seed=args.seed, batch_size=args.batch_size, progress=progress)
    name = args.edit or ("macbook" if state.get("pretrained") else "europarl")
    entry = load_edit(name, args.edits)
    return run_edit(model, tok, entry["word"], entry["from"], entry["to"], entry["prompts"],
                    heldout=_heldout(args, state, tok), name=name)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    target = eval_json_path(args.out, "--") if args.out else None  # refused before loading
    device, _, notes = resolve_device(args.device, task="steering")
    for note in notes:
        log.warning(note)
    model_path = args.model_path if is_pretrained(args.model_path) else paths.resolve_in_root(args.model_path)
    model, tok, state = load_model(model_path, device)
    result = run(args, model, tok, state)
    target = target or Path(model_path).parent / "eval.json"
    key = gender_key(result) if args.experiment == "gender" else args.experiment
    write_steering(target, Path(str(model_path)), state["model_type"], key, result)
    print(summary(args.experiment, result, args.compare_paper))
    print(f"wrote steering.{key} of {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
