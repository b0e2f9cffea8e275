"""What the steering experiments read and show, and where they are kept: the run's own data
(:func:`run_tokens`), text tables of a result, the paper's numbers beside them, and the
``steering`` section of an eval.json (the command line and ``notebooks/06_steering.ipynb`` both
read through :func:`run_tokens` and write through :func:`write_steering`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..dataset import load_tokens, resolve_data_dir
from ..errors import UserError
from ..eval_json import merge_eval_json, sections_of

log = logging.getLogger(__name__)

# The paper's numbers where the protocol is the paper's (steering.md; Table 5 and Table 3).
PAPER = {
    "gender": {"Transformer (projection)": {"bias_before": 7.02, "bias_project": 6.72,
                                            "bias_project_optimize": 7.02},
               "Backpack (sense 10)": {"bias_before": 4.34, "bias_remove": 2.88,
                                       "bias_optimize": 2.16}},
    "topic": {"0": 0.000, "1": 0.002, "2": 0.015, "3": 0.035},  # Toks-in-vocab by strength
}

GENDER_COLUMNS = (("bias_before", "before"), ("bias_remove", "Remove"), ("bias_optimize", "Optimize"),
                  ("weight", "w"), ("bias_project", "Project"), ("bias_project_optimize", "Proj.opt"),
                  ("p_they_before", "p(they)"), ("p_they_after", "p(they)'"))


def run_tokens(state: Mapping, split: str, what: str, fix: str = "",
               say: Callable[[str], object] = log.warning) -> np.ndarray | None:
    """The tokens of ``split`` of the dataset a checkpoint was trained on (its ``state``), when
    that is known and on disk; else ``say`` that ``what`` is left out and why, and None."""
    data_dir = state.get("data", {}).get("data_dir")
    try:
        if not data_dir:
            raise UserError("the checkpoint names no dataset")
        return load_tokens(resolve_data_dir(data_dir), split)
    except (UserError, OSError) as exc:
        say(f"{what} left out: the run's {split} data cannot be read ({exc}){fix}")
        return None


def gender_key(result: Mapping) -> str:
    """The steering section's key of a gender result: ``gender`` for an English set,
    ``gender_<language>`` for another (so the French set does not replace the English one)."""
    language = result.get("language") or "en"
    return "gender" if language == "en" else f"gender_{language}"


def gender_table(result: Mapping) -> str:
    """One line per noun and the mean, the columns the result has."""
    rows = result["nouns"]
    columns = [(k, name) for k, name in GENDER_COLUMNS if rows and k in rows[0]]
    width = max([len("mean")] + [len(r["noun"]) + 3 * (len(r["tokens"]) > 1) for r in rows])
    lines = [f"{'noun':<{width}} " + " ".join(f"{name:>9}" for _, name in columns)]
    for r in rows:
        label = r["noun"] + (f" ({len(r['tokens'])})" if len(r["tokens"]) > 1 else "")
        lines.append(f"{label:<{width}} " + " ".join(f"{r[k]:>9.5g}" for k, _ in columns))
    mean = result.get("mean", {})
    lines.append(f"{'mean':<{width}} " + " ".join(f"{mean[k]:>9.5g}" if k in mean else f"{'':>9}"
                                                  for k, _ in columns))
    notes = [f"gender sense {result.get('sense')}" + (f" (score {result['sense_score']:.3g}, found: "
                                                      f"{result['sense_found_by']})" if "sense_found_by" in result else "")]
    if any(len(r["tokens"]) > 1 for r in rows):
        notes.append("(n): a noun of n tokens, intervened on at all of them")
    unknown = [n for n, why in result.get("skipped", {}).items() if why.startswith("not in the vocabulary")]
    if unknown:
        notes.append(f"skipped, not in the vocabulary (byte tokens): {', '.join(unknown)}")
    notes += [f"skipped {n}: {why}" for n, why in result.get("skipped", {}).items() if n not in unknown]
    if "pronoun_counts" in result:
        notes.append("in the training data: " + ", ".join(f"{w!r} {n:,}" for w, n in result["pronoun_counts"].items()))
    for key in ("reduction_remove", "reduction_optimize", "reduction_project", "reduction_project_optimize"):
        if key in result:
            notes.append(f"{key}: {100 * result[key]:.0f}%")
    return "\n".join(lines + notes)


def topic_table(result: Mapping) -> str:
    """Per bag and strength: bag share, fluency loss, distinct-2."""
    lines = [f"{'bag':<14} {'strength':>8} {'bag share':>10} {'fluency':>8} {'distinct-2':>10}"]
    for bag, entry in result["bags"].items():
        for strength, m in entry.get("strengths", {}).items():
            lines.append(f"{bag:<14} {strength:>8} {m['bag_share']:>10.4f} {m['fluency_loss']:>8.3f} "
                         f"{m['distinct_2']:>10.3f}")
        if not entry.get("strengths"):
            lines.append(f"{bag:<14} no usable token: " + ", ".join(entry.get("skipped", {})))
    return "\n".join(lines)


def edit_table(result: Mapping) -> str:
    lines = [f"edit {result['word']!r}: {result['from']} -> {result['to']} (tokens "
             f"{result['from_token']!r} -> {result['to_token']!r})",
             f"{'prompt':<50} {'p(to)':>9} {'after':>9} {'p(from)':>9} {'after':>9}"]
    for r in result["per_prompt"] + [{"prompt": "mean", **result}]:
        lines.append(f"{r['prompt'][:50]:<50} {r['p_to_before']:>9.3g} {r['p_to_after']:>9.3g} "
                     f"{r['p_from_before']:>9.3g} {r['p_from_after']:>9.3g}")
    if "heldout_loss_before" in result:
        lines.append(f"held-out loss ({result['heldout_tokens']:,} tokens): "
                     f"{result['heldout_loss_before']:.4f} before, {result['heldout_loss_after']:.4f} after")
    return "\n".join(lines)


def summary(experiment: str, result: Mapping, compare_paper: bool) -> str:
    """The table of one experiment, with the paper's numbers when asked."""
    if experiment == "gender":
        text = gender_table(result)
        if compare_paper:
            text += "\n" + "\n".join(f"paper, {name}: " + ", ".join(f"{k} {v}" for k, v in numbers.items())
                                     for name, numbers in PAPER["gender"].items())
    elif experiment == "topic":
        text = topic_table(result)
        if compare_paper:
            text += "\npaper (Backpack-Small, all topics, Toks-in-vocab): " + ", ".join(
                f"{s}: {v:.3f}" for s, v in PAPER["topic"].items())
    else:
        text = edit_table(result)
        if compare_paper:
            text += "\npaper: Table 6 shows samples only; no numbers to compare"
    return text


def write_steering(target: Path, model_path: Path, model_type: str, key: str, result: Mapping) -> None:
    """``result`` as ``steering.<key>`` of ``target``, keeping the other experiments already
    in its steering section and every other section (when it belongs to the same checkpoint)."""
    steering = sections_of(target, model_path).get("steering")
    steering = {**(steering if isinstance(steering, dict) else {}), key: finite(result)}
    merge_eval_json(target, model_path, {"model_type": model_type, "checkpoint": str(model_path),
                                         "steering": steering}, "--")


def finite(value):
    """JSON holds no inf or NaN: they become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
