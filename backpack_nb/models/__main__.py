"""Print the parameter counts of the models a params file describes, by part.

    python -m backpack_nb.models --config train_europarl_scratch --vocab-size 100277

The models are built on the ``meta`` device (shapes only, no memory), so even a 200k x 16 x
384 sense table is counted instantly. Both sense sources are shown for the Backpack; the
one the config selects is marked with ``*``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from backpack_nb.errors import UserError, command
from backpack_nb.models import ConfigError, ModelConfig, build_model
from backpack_nb.params import read_params_file


# Prepared token files hold at most uint32 ids (cl100k has 100,277); far past this, torch
# cannot even size the weights on the meta device.
MAX_VOCAB = 2**32


def load_params(config: str) -> dict[str, Any]:
    """A params mapping from a name under ``params/`` or a path to a YAML file (read the
    same way as ``train.py --config`` reads it)."""
    return read_params_file(config)


def parameter_table(params: dict[str, Any], vocab_size: int) -> str:
    """The by-part counts of the Transformer and of the Backpack with each sense source."""
    config = ModelConfig.from_params(params, vocab_size)
    columns: dict[str, dict[str, int]] = {}
    with torch.device("meta"):
        columns["transformer"] = build_model("transformer", config).num_parameters()
        for source in ("network", "table"):
            variant = ModelConfig.from_dict({**config.to_dict(), "sense_source": source})
            name = f"backpack/{source}" + ("*" if source == config.sense_source else "")
            try:
                columns[name] = build_model("backpack", variant).num_parameters()
            except ConfigError:  # a Transformer config's n_senses need not divide n_embd
                if params.get("model_type") == "backpack":
                    raise

    rows: list[str] = []
    for counts in columns.values():
        rows += [part for part in counts if part not in rows and part != "total"]
    rows.append("total")
    width = max(len(r) for r in rows)

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<{width}}" + "".join(f"{cell:>20}" for cell in cells)

    lines = [line("part", list(columns))]
    for row in rows:
        lines.append(line(row, [f"{c[row]:,}" if row in c else "-" for c in columns.values()]))
    lines.append(line("", [f"{c['total'] / 1e6:.1f}M" for c in columns.values()]))
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m backpack_nb.models", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="name under params/ or a path to a .yaml")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size V")
    args = parser.parse_args(argv)
    if not 1 <= args.vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size: must be in 1..{MAX_VOCAB:,}, got {args.vocab_size:,}")
    params = load_params(args.config)
    config = ModelConfig.from_params(params, args.vocab_size)
    print(
        f"{args.config}: V={config.vocab_size:,} d={config.n_embd} layers={config.n_layer} "
        f"heads={config.n_head} senses={config.n_senses} block={config.block_size} "
        f"bias={config.bias} (model_type {params.get('model_type', '?')}; tied head, "
        "counted once)"
    )
    print(parameter_table(params, args.vocab_size))


if __name__ == "__main__":
    main()
