"""The shape of a model: one typed, validated dataclass shared by the Backpack and the Transformer.

A ``params/<name>.yaml`` file is a flat mapping that mixes model, data and training keys;
:meth:`ModelConfig.from_params` picks out the model keys and ignores the rest. Every problem
found is reported at once, in one :class:`ConfigError`, so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from backpack_nb.coerce import brief, documented
from backpack_nb.errors import UserError

MODEL_TYPES = ("backpack", "transformer")
SENSE_SOURCES = ("network", "table")


class ConfigError(UserError):
    """A model configuration with one or more problems; the message lists all of them."""

    def __init__(self, problems: list[str], where: str = "model config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(
            f"invalid {where}: {n} problem{'s' if n != 1 else ''}:\n{lines}\n"
            "Fix these values in the params YAML (or the checkpoint's config) and try again."
        )


@dataclass(frozen=True)
class ModelShape:
    """A model's shape but its vocabulary: the keys a params file sets for the model, declared
    once. :class:`ModelConfig` adds the vocabulary (which the dataset decides) and
    :class:`backpack_nb.params.TrainConfig` builds on these fields. Defaults are the seed's
    Backpack-Micro shape; each field's help (``--help``, the docs) is its metadata."""

    block_size: int = documented(512, """
        Longest context in tokens; the number of learned position embeddings.""")

    n_layer: int = documented(6, """
        Transformer blocks (in the Backpack: in the network that computes the weights alpha).""")

    n_head: int = documented(6, "Attention heads per block; n_embd must be divisible by it.")

    n_embd: int = documented(384, "Width d of embeddings, hidden states and sense vectors.")

    n_senses: int = documented(16, """
        Sense vectors k per token type (Backpack only; n_embd must be divisible by it, since
        the k contextualization heads split d). The Transformer ignores it (the seed sets 1).""")

    sense_source: str = documented("network", """
        Where the Backpack's sense vectors C(x) come from: ``"network"`` (the paper's sense
        network on the shared embedding) or ``"table"`` (a free V x k x d lookup, this project's
        extension; huge at large V).""")

    dropout: float = documented(0.1, """
        Dropout probability in [0, 1) on embeddings, residual adds and attention (the seed
        trains with 0.1; a model only evaluated or sampled runs in eval mode, without it).""")

    bias: bool = documented(False, """
        Biases in the Linear and LayerNorm layers. The Backpack's d -> 2d contextualization
        projection always has one, as in the paper. ``False`` (the seed) gives the counts in
        docs/models.md (41.6M Backpack-Micro); ``True`` gives the official code's 41.7M.""")

    scale_attn_by_inverse_layer_idx: bool = documented(False, """
        Divide the attention scores of Transformer layer l (0-based) by l + 1, besides the
        usual 1/sqrt(head size): GPT-2's option (the name is Hugging Face's), which the released
        Backpack (stanfordnlp/backpack-gpt2) uses. Off for models trained here.""")


@dataclass(frozen=True)
class ModelConfig(ModelShape):
    """Everything needed to build a :class:`~backpack_nb.models.GPT` or
    :class:`~backpack_nb.models.BackpackLM` (the model type itself is chosen by
    :func:`~backpack_nb.models.build_model`): the shape and the vocabulary, given by name."""

    vocab_size: int = documented(
        dataclasses.MISSING, "Number of token ids V; rows of the shared embedding E (V x d), "
        "which is also the head.", kw_only=True)

    def __post_init__(self) -> None:
        problems = config_problems(dataclasses.asdict(self))
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "dropout", float(self.dropout))  # YAML may say `0`

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_params(cls, params: Mapping[str, Any], vocab_size: int) -> "ModelConfig":
        """The model part of a flat params mapping (a ``params/*.yaml`` file). Keys that are
        not model keys are ignored; missing model keys take the defaults. When ``params`` has
        a ``model_type`` it is checked too, with the problems specific to that model."""
        values = {k: params[k] for k in MODEL_KEYS if k in params}
        values["vocab_size"] = vocab_size
        model_type = params.get("model_type")
        problems = config_problems({**_defaults(), **values}, model_type)
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able values, for checkpoints and sidecar files."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys are a problem (a checkpoint from another
        version of the code should fail loudly, not load half its shape)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        problems = [f"unknown key {brief(k)}" for k in values if k not in fields]
        problems += config_problems({**_defaults(), **values})
        if problems:
            raise ConfigError(problems)
        return cls(**{k: values[k] for k in fields if k in values})

    def validate_for(self, model_type: str) -> None:
        """Raise :class:`ConfigError` if this config cannot build ``model_type``."""
        problems = config_problems(dataclasses.asdict(self), model_type)
        if problems:
            raise ConfigError(problems)


# The keys of a flat params file that belong to the model (model_type picks the class); the
# training config (backpack_nb.params.TrainConfig) builds on ModelShape, which declares them.
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelShape))
# The fields' kinds, as declared above: counts (integers >= 1; the vocabulary first) and flags
_COUNT_KEYS = ("vocab_size", *(f.name for f in dataclasses.fields(ModelShape) if f.type == "int"))
_FLAG_KEYS = tuple(f.name for f in dataclasses.fields(ModelShape) if f.type == "bool")
# Keys only the Backpack reads (the Transformer ignores them).
BACKPACK_KEYS = ("n_senses", "sense_source")


def model_shape_keys(model_type: str = "backpack") -> tuple[str, ...]:
    """Keys that fix the model, the shapes of its weights and what they compute
    (``model_type`` and the model keys but dropout): a checkpoint resumes only with the same
    values. Schedule keys may change on resume."""
    return ("model_type",) + tuple(
        k for k in MODEL_KEYS
        if k != "dropout" and (model_type == "backpack" or k not in BACKPACK_KEYS))


def _defaults() -> dict[str, Any]:
    return {
        f.name: f.default
        for f in dataclasses.fields(ModelConfig)
        if f.default is not dataclasses.MISSING
    }


def config_problems(values: Mapping[str, Any], model_type: str | None = None) -> list[str]:
    """Every problem with these ModelConfig values (an empty list when they are fine).
    A ``model_type`` is checked itself and adds the checks that only that model needs."""
    problems: list[str] = []

    def is_int(x: Any) -> bool:  # YAML's `true` is a bool, which is an int to Python
        return isinstance(x, int) and not isinstance(x, bool)

    ints_ok = {}
    for name in _COUNT_KEYS:  # every count is at least 1
        value = values.get(name)
        if not is_int(value):
            problems.append(f"{name} must be an integer (got {brief(value)})")
        elif value < 1:
            problems.append(f"{name} must be >= 1 (got {value})")
        else:
            ints_ok[name] = value

    dropout = values.get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        problems.append(f"dropout must be a number (got {brief(dropout)})")
    elif not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1) (got {dropout})")

    for name in _FLAG_KEYS:
        if not isinstance(values.get(name), bool):
            problems.append(f"{name} must be true or false (got {brief(values.get(name))})")

    source = values.get("sense_source")
    if source not in SENSE_SOURCES:
        problems.append(f"sense_source must be one of {', '.join(SENSE_SOURCES)} (got {brief(source)})")

    n_embd = ints_ok.get("n_embd")
    if n_embd is not None and "n_head" in ints_ok and n_embd % ints_ok["n_head"]:
        problems.append(f"n_embd ({n_embd}) must be divisible by n_head ({ints_ok['n_head']})")

    if model_type is not None and model_type not in MODEL_TYPES:
        problems.append(f"model_type must be one of {', '.join(MODEL_TYPES)} (got {brief(model_type)})")
    if model_type == "backpack" and n_embd is not None and "n_senses" in ints_ok:
        if n_embd % ints_ok["n_senses"]:
            problems.append(
                f"n_embd ({n_embd}) must be divisible by n_senses ({ints_ok['n_senses']}) "
                "for the Backpack (the k contextualization heads split d)"
            )
    return problems
