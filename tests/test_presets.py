"""Presets say only what differs from what they build on (``base:``), and every front door
resolves a preset to the same values: train.py --config and the reports runner (through
load_params), and a plain ``papermill -f params/X.yaml`` (the file's own keys injected into a
notebook, read by results.config_from_notebook). The values are those of a snapshot taken
before presets could build on each other (tests/fixtures/presets_resolved.json)."""

from __future__ import annotations

import json

import pytest

from backpack_nb.errors import UserError
from backpack_nb.paramfile import BASE_KEY, read_own_keys, read_params_file
from backpack_nb.paramfile import available_configs
from backpack_nb.params import load_params
from backpack_nb.results import config_from_notebook
from conftest import ROOT

SNAPSHOT = json.loads((ROOT / "tests" / "fixtures" / "presets_resolved.json").read_text())
# What the notebooks' parameters cell defines above papermill's injected cell (01_train)
NOTEBOOK_CELL = {"params_file": "tiny_backpack", "out_dir": None, "init_from": None,
                 "max_iters": None, "live_plot": True}
DERIVED = {"train_europarl_transformer_baseline": "train_europarl_scratch",
           "tiny_transformer": "tiny_backpack", "transformer_mini": "backpack_mini",
           "backpack_mini": "train_europarl_scratch", "backpack_table": "train_europarl_scratch"}


def test_every_preset_is_in_the_snapshot():
    assert sorted(SNAPSHOT) == available_configs()


@pytest.mark.parametrize("name", available_configs())
def test_every_front_door_resolves_a_preset_to_its_snapshot(name):
    assert load_params(name).to_dict() == SNAPSHOT[name]
    injected = {**NOTEBOOK_CELL, **read_own_keys(name)}  # papermill -f params/NAME.yaml
    assert config_from_notebook(injected).to_dict() == SNAPSHOT[name]


@pytest.mark.parametrize("name,base", sorted(DERIVED.items()))
def test_a_derived_preset_writes_only_what_differs(name, base):
    own = read_own_keys(name)
    assert own[BASE_KEY] == base
    under = read_params_file(base)
    assert all(under.get(k) != v for k, v in own.items() if k != BASE_KEY), \
        "a key set to its base's value says nothing"
    assert len(own) <= 6


def _preset(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def test_a_chain_of_bases_resolves_and_the_nearer_file_wins(tmp_path):
    first = _preset(tmp_path, "first", "base: tiny_backpack\nmax_iters: 7\nseed: 3\n")
    second = _preset(tmp_path, "second", f"base: {first}\nseed: 5\n")
    cfg = load_params(second)
    assert (cfg.max_iters, cfg.seed, cfg.n_layer) == (7, 5, load_params("tiny_backpack").n_layer)


def test_a_base_that_is_missing_or_circular_is_one_error(tmp_path):
    missing = _preset(tmp_path, "missing", "base: tiny_backpak\nseed: 3\n")
    with pytest.raises(UserError, match=r"missing.yaml: base: config 'tiny_backpak' not found"
                                        r".*Did you mean 'tiny_backpack'"):
        load_params(missing)
    a = str(tmp_path / "a.yaml")
    b = _preset(tmp_path, "b", f"base: {a}\nseed: 3\n")
    _preset(tmp_path, "a", f"base: {b}\nseed: 4\n")
    with pytest.raises(UserError, match="leads back to itself"):
        load_params(a)
    with pytest.raises(UserError, match="base: 3 is not a params name"):
        load_params(_preset(tmp_path, "number", "base: 3\nseed: 3\n"))
