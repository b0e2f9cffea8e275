"""Typed training configuration: ``params/<name>.yaml`` -> dict -> :class:`TrainConfig`.

One path serves every front door. ``train.py --config NAME`` reads the YAML file into a flat
dict, lays command-line overrides (``--learning_rate 1e-3``, ``--compile``) over it and builds a
:class:`TrainConfig`; ``papermill -f params/NAME.yaml`` injects the same flat keys as notebook
variables, and the notebook builds its config with the same :meth:`TrainConfig.from_dict`.
Validation looks at every key and raises one :class:`UserError` that lists every problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import typing
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, NoReturn, Sequence

from backpack_nb.coerce import BRIEF_CHARS, brief, coerce, documented, field_help
from backpack_nb.device_names import DTYPES, device_problem
from backpack_nb.errors import UserError, command
from backpack_nb.model_source import INIT_FROM, is_pretrained
from backpack_nb.model_config import MODEL_KEYS, MODEL_TYPES, ModelShape, config_problems
from backpack_nb.paramfile import read_params_file

# torch.manual_seed takes at most an unsigned 64-bit integer; the training adds the rank and
# fixed offsets for evaluation to the seed, so seeds stop at the signed limit (as sample.py's)
MAX_SEED = 2**63 - 1
MAX_INT = 2**63 - 1  # every count ends up in an int64 somewhere (torch, numpy, JSON readers)
MAX_PROBLEMS_SHOWN = 20
LOGGERS = ("none", "tensorboard", "wandb")  # backpack_nb.training.loggers
# What backpack_nb.europarl reads: its 21 languages, per-day files or aligned pairs
EUROPARL_LANGS = ("bg cs da de el en es et fi fr hu it lt lv nl pl pt ro sk sl sv").split()
DATA_FORMS = ("raw", "aligned")


@dataclass(frozen=True)
class TrainConfig(ModelShape):
    """Everything one training run needs: the model's shape (the fields of
    :class:`~backpack_nb.model_config.ModelShape`, declared there) and the fields below.
    Defaults are the seed's Backpack run (``params/train_europarl_scratch.yaml``). Each
    field's help text (``train.py --help``) is its metadata."""

    # --- run -----------------------------------------------------------------------------
    run_name: str = documented("backpack_full", """
        A short name for the run, shown in logs and notebooks.""")
    model_type: str = documented("backpack", """
        Which model to train: ``backpack`` or ``transformer`` (the baseline).""")
    out_dir: str = documented("out/backpack_full", """
        Folder for ckpt.pt, best.pt, training_log.json and run.json; a relative path is taken
        from the project root, not the current directory.""")
    init_from: str = documented("scratch", """
        ``scratch`` starts a new run (refused where a checkpoint exists, unless ``overwrite``);
        ``resume`` continues from ``out_dir/ckpt.pt`` (or ``ckpt.prev.pt``); ``hf:<repo id>`` or a
        folder holding a Hugging Face model's config.json starts a new run from those weights,
        whose shape it takes (a fine-tune; docs/hub.md).""")
    overwrite: bool = documented(False, """
        Let ``init_from: scratch`` replace the checkpoints already in ``out_dir``.""")

    # --- data ----------------------------------------------------------------------------
    data_dir: str = documented("europarl", """
        Prepared dataset: a name under the data root (``europarl``) or a path; prepared on
        first use.""")
    data_source: str = documented("", """
        Where raw Europarl comes from when preparing: empty means the ``EUROPARL_SOURCE``
        environment variable, else the official archives.""")
    data_form: str = documented("raw", """
        Europarl form to read: ``raw`` (per-day files) or ``aligned`` (sentence pairs).""")
    languages: str = documented("en,fr", """
        Comma-separated Europarl language codes to train on.""")
    encoding: str = documented("cl100k_base", """
        tiktoken encoding the compact vocabulary is taken from.""")

    # --- optimisation --------------------------------------------------------------------
    batch_size: int = documented(32, """
        Sequences per micro-batch per process. The effective batch is batch_size x
        gradient_accumulation_steps x processes.""")
    gradient_accumulation_steps: int = documented(1, """
        Micro-batches summed into one optimizer step.""")
    learning_rate: float = documented(3e-4, """
        Peak learning rate, reached after ``warmup_iters``.""")
    min_lr: float = documented(3e-5, """
        Learning rate at the end of the cosine decay (and after it).""")
    warmup_iters: int = documented(500, """
        Iterations of linear warmup from 0 to ``learning_rate``.""")
    lr_decay_iters: int = documented(50000, """
        Iteration at which the cosine decay reaches ``min_lr``.""")
    max_iters: int = documented(50000, """
        Total optimizer steps; resuming with a larger value continues a finished run.""")
    weight_decay: float = documented(0.1, """
        AdamW weight decay, applied to matrices only (not biases, norms).""")
    beta1: float = documented(0.9, "AdamW beta1.")
    beta2: float = documented(0.95, "AdamW beta2.")
    grad_clip: float = documented(1.0, """
        Clip the global gradient norm to this value; 0 disables clipping.""")
    sparse_table: bool = documented(False, """
        Train a sense *table* with sparse row-wise updates (SparseAdam on the rows of each
        batch's tokens, AdamW on everything else): less memory and time, but lazy moments and no
        weight decay on the table. Backpack with ``sense_source: table`` only; fixed for a run.""")
    seed: int = documented(1337, """
        Seed for weights, dropout and batch sampling; a run is reproducible from it.""")

    # --- evaluation, logging, checkpoints ------------------------------------------------
    eval_interval: int = documented(500, """
        Evaluate (train/val loss, sense words) every this many iterations.""")
    eval_iters: int = documented(200, "Batches averaged per split at each evaluation.")
    checkpoint_interval: int = documented(2500, """
        Also save ckpt.pt every this many iterations (besides on improvement and at the end).""")
    log_interval: int = documented(10, """
        Update the progress bar / print a progress line every this many iterations.""")
    logger: str = documented("none", """
        Live curves besides training_log.json: ``none``, ``tensorboard`` (event files in
        ``out_dir/tensorboard``) or ``wandb`` (Weights & Biases; ``WANDB_MODE=offline`` works
        without an account). Rank 0 logs loss, lr, tokens/s and MFU every ``log_interval`` and
        both losses at every evaluation; a resumed run continues the same curves. Each needs its
        extra: ``pip install -e '.[tensorboard]'`` or ``'.[wandb]'``.""")
    probe_words: list[str] = documented(doc="""
        Words whose sense top words are logged at each evaluation (Backpack only); a YAML list
        or a comma-separated string. Empty: frequent content words of the training data.""",
        factory=list)
    probe_words_per_language: int = documented(4, """
        How many default probe words to take from each language when ``probe_words`` is empty.""")
    sense_top_k: int = documented(10, """
        Top (and bottom) words recorded per sense of each probe word.""")

    # --- hardware ------------------------------------------------------------------------
    device: str = documented("cuda", """
        ``cuda``, ``cuda:N``, ``mps`` or ``cpu``. Without CUDA, ``cuda`` falls back to the CPU
        with a warning (or an error with ``strict_device``).""")
    dtype: str = documented("float16", """
        Autocast precision: ``float16`` (with a gradient scaler), ``bfloat16`` or ``float32``.""")
    compile: bool | None = documented(None, """
        Compile the model with ``torch.compile``: ``true``, ``false``, or ``auto`` (null, the
        default): on for CUDA, off elsewhere (on the CPU it works but gains little for a cold
        compile of a minute or so; ``python -m benchmarks.speed`` measures it).""")
    activation_checkpointing: bool = documented(False, """
        Recompute each Transformer block's activations in backward instead of storing them:
        about a third more compute in the blocks, most of their activation memory saved. For
        configurations that do not fit otherwise (``python -m benchmarks.memory``).""")
    fused_loss: bool = documented(False, """
        Compute each chunk of the loss's softmax and gradient in one compiled function instead
        of a dozen eager passes over it (same values): a speed lever for a GPU at large
        vocabularies, off until a GPU measurement says it pays (docs/performance.md).""")
    distinct_on_host: bool = documented(False, """
        Backpack: find each batch's distinct tokens (whose senses are computed once) where the
        batch is assembled, padded to a few sizes, instead of on the device: no device sync in the
        step, static shapes for the compiler. Off until a GPU measurement says it pays.""")
    strict_device: bool = documented(False, """
        Refuse to fall back to another device or dtype than the one asked for.""")

    # --- test hook -----------------------------------------------------------------------
    stop_after: int | None = documented(None, """
        Stop as if interrupted (save, return) once this iteration is reached; for tests that
        interrupt a run deterministically. None: run to ``max_iters``.""")

    # ---------------------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every configuration key, in a params file's order: the run's keys, the model's shape
        (declared on :class:`ModelShape`), then data, optimisation and the rest."""
        own = [f.name for f in dataclasses.fields(cls) if f.name not in MODEL_KEYS]
        at = own.index("data_dir")
        return (*own[:at], *MODEL_KEYS, *own[at:])

    @classmethod
    def from_dict(
        cls,
        values: Mapping[str, Any],
        *,
        source: str = "config",
        cli_keys: Sequence[str] = (),
    ) -> "TrainConfig":
        """Build and validate a config from flat key -> value pairs (a YAML file, CLI overrides,
        papermill-injected notebook variables). Missing keys take their defaults. Strings are
        accepted for numbers and booleans, because command-line values, papermill parameters
        and PyYAML's ``1e-3`` (read as a string by YAML 1.1) all arrive as text. Raises one
        :class:`UserError` naming ``source`` and listing every problem."""
        problems: list[str] = []
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        for key in unknown:
            hint = difflib.get_close_matches(str(key), known, n=1)
            problems.append(
                f"unknown key {brief(key)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        kwargs: dict[str, Any] = {}
        mistyped: set[str] = set()
        for name, value in values.items():
            if name not in known:
                continue
            try:
                kwargs[name] = coerce(value, _field_types()[name])
            except ValueError as exc:
                mistyped.add(name)
                problems.append(f"{'--' if name in cli_keys else ''}{name}: {exc}")
        cfg = cls(**kwargs)
        # a mistyped key kept its default; its range check would only repeat the complaint
        for p in cfg._value_problems():
            key = re.split(r"[:\s]", p, maxsplit=1)[0]
            if key not in mistyped:
                problems.append(f"--{p}" if key in cli_keys else p)
        if problems:
            lines = [f"{source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:"]
            # each line cut short, and not thousands of them: values are echoed (some by
            # other modules' checks), and a file or a pasted value can be of any size
            lines += [f"  - {p if len(p) <= 2 * BRIEF_CHARS else p[:2 * BRIEF_CHARS] + '...'}"
                      for p in problems[:MAX_PROBLEMS_SHOWN]]
            if len(problems) > MAX_PROBLEMS_SHOWN:
                lines.append(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
            if unknown:
                lines.append("valid keys: " + ", ".join(cls.keys()))
            raise UserError("\n".join(lines))
        return cfg

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any],
                       source: str = "notebook parameters") -> "TrainConfig":
        """The config from the keys found among a notebook's variables (``globals()`` after
        papermill injected ``params/NAME.yaml``); every other variable is ignored."""
        return cls.from_dict({k: namespace[k] for k in cls.keys() if k in namespace},
                             source=source)

    def to_dict(self) -> dict[str, Any]:
        """Plain key -> value pairs (the YAML layout); safe to store in a checkpoint."""
        values = dataclasses.asdict(self)
        return {k: values[k] for k in self.keys()}

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some keys changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def language_list(self) -> list[str]:
        """``languages`` as a list of codes."""
        return list(parse_langs(self.languages))

    def _value_problems(self) -> list[str]:
        """Range and choice checks, run after every field has the right type."""
        p: list[str] = []

        def choice(name: str, options: Sequence[str]) -> None:
            v = getattr(self, name)
            if v not in options:
                p.append(f"{name}: {brief(v)} is not one of {', '.join(options)}")

        def at_least(name: str, lo: float) -> None:
            v = getattr(self, name)
            if v < lo:
                p.append(f"{name}: must be >= {lo:g}, got {v}")

        # A newline in out_dir makes a folder no one can type, and splits the one-value-a-line
        # output of `python -m backpack_nb.params get` that shell scripts read: never meant.
        texts = [n for n, t in _field_types().items() if t is str] + ["probe_words"]
        garbled = {n for n in texts if _control_character(getattr(self, n))}
        for name in sorted(garbled, key=texts.index):
            p.append(f"{name}: {brief(getattr(self, name))} holds a control character "
                     f"({_control_character(getattr(self, name))}), a quoting or copy-paste "
                     "slip in a name or path: retype the value without it")
        choice("model_type", MODEL_TYPES)
        if "init_from" not in garbled and self.init_from not in INIT_FROM:
            try:
                pretrained = is_pretrained(self.init_from)
            except OSError as exc:  # a name too long for the file system
                pretrained, why = False, f" ({exc.strerror})"
            else:
                why = ""
            if not pretrained:
                p.append(f"init_from: {brief(self.init_from)} is not one of "
                         f"{', '.join(INIT_FROM)}, hf:<repo id> or a folder holding a Hugging "
                         f"Face model's config.json{why}")
        choice("data_form", DATA_FORMS)
        choice("dtype", DTYPES)
        choice("logger", LOGGERS)
        if device_problem(self.device):
            p.append(device_problem(self.device))
        # The model's shape is checked by the models' own rules, so the two never disagree.
        model_type = self.model_type if self.model_type in MODEL_TYPES else None
        shape = {k: getattr(self, k) for k in MODEL_KEYS}
        p += config_problems({**shape, "vocab_size": 1}, model_type)
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "checkpoint_interval", "log_interval", "sense_top_k"):
            at_least(name, 1)
        for name in ("warmup_iters", "lr_decay_iters", "probe_words_per_language",
                     "weight_decay", "grad_clip", "min_lr"):
            at_least(name, 0)
        if self.max_iters < 1:
            # 0 would train nothing, save no checkpoint and still leave a "finished" run
            p.append(f"max_iters: must be >= 1, got {self.max_iters}" + (
                " (a run of no iteration trains nothing and saves no checkpoint; to score a "
                "model, use evaluate.py)" if self.max_iters == 0 else ""))
        if self.warmup_iters > self.lr_decay_iters >= 0:
            p.append(f"warmup_iters: {self.warmup_iters} is past lr_decay_iters = "
                     f"{self.lr_decay_iters}: the learning rate would climb to learning_rate "
                     "and then drop at once to min_lr; set warmup_iters <= lr_decay_iters")
        if not 0 <= self.seed <= MAX_SEED:
            p.append(f"seed: must be in 0..{MAX_SEED}, got {brief(self.seed)}")
        for name, typ in _field_types().items():
            value = getattr(self, name)
            if name != "seed" and int in (typ, *typing.get_args(typ)) \
                    and isinstance(value, int) and value > MAX_INT:
                p.append(f"{name}: must be <= {MAX_INT}, got {brief(value)}")
        if not self.learning_rate > 0:
            p.append(f"learning_rate: must be > 0, got {self.learning_rate}")
        elif self.min_lr > self.learning_rate:
            p.append(f"min_lr: {self.min_lr} is above learning_rate = {self.learning_rate}")
        if self.sparse_table and (self.model_type, self.sense_source) != ("backpack", "table"):
            p.append("sparse_table: needs model_type backpack with sense_source table; "
                     "set sparse_table: false")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                p.append(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        langs = self.language_list()
        bad = [x for x in langs if x not in EUROPARL_LANGS]
        if not langs:
            p.append("languages: empty; give comma-separated codes such as en,fr")
        elif bad:
            p.append(f"languages: {brief(', '.join(bad), quote=False)} not in Europarl "
                     f"({', '.join(EUROPARL_LANGS)})")
        for name in ("run_name", "out_dir", "data_dir", "encoding"):
            if not getattr(self, name).strip():
                p.append(f"{name}: must not be empty")
        if any(c in self.run_name for c in "/\\") or self.run_name in (".", ".."):
            p.append(f"run_name: {brief(self.run_name)} names the reports' folder (outputs/"
                     "<run_name>): no '/' and not '..'")
        if self.stop_after is not None and self.stop_after < 0:
            p.append(f"stop_after: must be >= 0 or null, got {self.stop_after}")
        return p


# --- params files (read by backpack_nb.paramfile) ------------------------------------------


def load_params(
    name_or_path: str, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Read ``params/NAME.yaml`` (or a path), lay ``overrides`` over it and validate."""
    values = read_params_file(name_or_path)
    overrides = dict(overrides or {})
    return TrainConfig.from_dict(
        {**values, **overrides},
        source=f"config {name_or_path!r} with command-line overrides" if overrides
        else f"config {name_or_path!r}",
        cli_keys=tuple(overrides),
    )


# --- command line --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting, so front doors
    print one ``error:`` line and tests can call ``main(argv)`` in-process."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m:
            hints = []
            for arg in m.group(1).split():
                if arg.startswith("--"):
                    name = arg[2:].split("=")[0].replace("-", "_")
                    close = difflib.get_close_matches(name, TrainConfig.keys(), n=1)
                    hints += [f"--{close[0]}"] if close else []
            message += f" (did you mean {', '.join(hints)}?)" if hints else ""
            message += "; run with --help to list every option"
        raise UserError(message)


def build_arg_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """``--config NAME`` plus one ``--key value`` option per TrainConfig field (booleans also
    as bare flags: ``--compile``, ``--no-compile``, ``--compile false``). Values stay strings:
    TrainConfig.from_dict types them, so YAML and CLI problems are reported together."""
    parser = _Parser(
        prog=prog,
        description="Train a Backpack language model or its Transformer baseline.",
        allow_abbrev=False,  # a prefix like --comp must not silently mean --compile
        argument_default=argparse.SUPPRESS,  # only keys the user typed override the YAML
    )
    parser.add_argument("--config", help="params/NAME.yaml to start from (or a path to one)")
    docs = field_docs()
    types = _field_types()
    for name in TrainConfig.keys():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        help_text = docs.get(name, "")
        if types[name] in (bool, bool | None):
            parser.add_argument(*flags, dest=name, nargs="?", const="true",
                                metavar="true|false" + ("|auto" if types[name] is not bool else ""),
                                help=help_text)
            parser.add_argument(f"--no-{name.replace('_', '-')}", f"--no_{name}", dest=name,
                                action="store_const", const="false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=name, metavar=name.upper(), help=help_text)
    return parser


def config_from_argv(argv: Sequence[str] | None) -> TrainConfig:
    """Parse a train.py command line into a validated TrainConfig (CLI values win over the
    YAML file given by --config)."""
    ns = vars(build_arg_parser().parse_args(argv))
    name = ns.pop("config", None)
    if name is None:
        return TrainConfig.from_dict(ns, source="command line", cli_keys=tuple(ns))
    return load_params(name, ns)


def named_data_dir(argv: Sequence[str] | None) -> Any:
    """Where a train.py command line types ``--data_dir``: the data_dir its params file names
    (or the default), the one dataset prepared on first use; None when it types none. See
    :func:`backpack_nb.dataset.train_config`."""
    ns = vars(build_arg_parser().parse_args(argv))
    if "data_dir" not in ns:
        return None
    name = ns.get("config")
    default = TrainConfig().data_dir
    return read_params_file(name).get("data_dir", default) if name else default


def typed_keys(argv: Sequence[str] | None) -> set[str]:
    """The TrainConfig keys a train.py command line sets (not those of its --config file)."""
    return set(vars(build_arg_parser().parse_args(argv))) - {"config"}


def parse_langs(langs: str | Sequence[str]) -> tuple[str, ...]:
    """Language codes from ``en,fr`` (commas or spaces) or a list, lower-cased."""
    if isinstance(langs, str):
        langs = [l for l in re.split(r"[,\s]+", langs) if l]
    return tuple(l.strip().lower() for l in langs)


# --- typing helpers ------------------------------------------------------------------------


def _control_character(value: str | list[str]) -> str:
    """Where ``value`` (a text, or a list of words) has a control character (a newline, a
    tab, NUL, a Unicode line separator), said for a message; empty when it has none."""
    for text in [value] if isinstance(value, str) else value:
        for i, c in enumerate(text):
            if unicodedata.category(c) in ("Cc", "Zl", "Zp"):
                return f"{c!r} at character {i + 1}"
    return ""


@lru_cache(maxsize=None)
def _field_types() -> dict[str, Any]:
    # `from __future__ import annotations` makes annotations strings; resolve them once.
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def field_docs() -> dict[str, str]:
    """Each key's help text (its field's metadata), for --help and notebooks."""
    return field_help(TrainConfig)


# --- python -m backpack_nb.params --------------------------------------------------------------


def format_value(value: Any) -> str:
    """A config value as shell scripts read it: true/false, empty for null, lists
    comma-joined, numbers as Python prints them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@command
def main(argv: Sequence[str] | None = None) -> int:
    """``get CONFIG KEY [KEY ...] [--only-set]``: each key's validated value (defaults
    included, unless ``--only-set``), one per line, for shell scripts such as gcp_setup.sh."""
    parser = _Parser(prog="python -m backpack_nb.params",
                     description="Read validated values from a params file.")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get", help="print each key's value (after validation) on its own line")
    get.add_argument("config", help="params/NAME.yaml (a name) or a path to a YAML file")
    get.add_argument("keys", nargs="+", metavar="KEY")
    get.add_argument("--only-set", action="store_true",
                     help="an empty line for a key the file does not set (instead of its default)")
    args = parser.parse_args(argv)
    in_file = read_params_file(args.config)
    cfg = load_params(args.config)
    unknown = [k for k in args.keys if k not in TrainConfig.keys()]
    if unknown:
        hints = [h for k in unknown for h in difflib.get_close_matches(k, TrainConfig.keys(), n=1)]
        raise UserError(f"unknown key(s) {', '.join(brief(k, quote=False) for k in unknown)}"
                        + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                        + f"; keys: {', '.join(TrainConfig.keys())}")
    for key in args.keys:
        print("" if args.only_set and key not in in_file else format_value(getattr(cfg, key)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
