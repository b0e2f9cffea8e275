"""TrainConfig: every shipped params file loads, bad input is reported all at once, the
command line overrides the YAML."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from backpack_nb.errors import UserError
from backpack_nb.models import ModelConfig, build_model
from backpack_nb.model_config import model_shape_keys
from backpack_nb.paramfile import available_configs, params_path, read_params_file
from backpack_nb.params import TrainConfig, config_from_argv, field_docs, load_params
from backpack_nb.paths import params_dir

SHIPPED = available_configs()
PAIRS = [("train_europarl_scratch", "train_europarl_transformer_baseline"),
         ("tiny_backpack", "tiny_transformer"), ("backpack_mini", "transformer_mini")]


def test_the_required_presets_ship():
    for name in ("train_europarl_scratch", "train_europarl_transformer_baseline",
                 "tiny_backpack", "tiny_transformer", "backpack_table", "backpack_mini",
                 "transformer_mini"):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_builds(name):
    cfg = load_params(name)
    # Every key of the file is a TrainConfig key (papermill injects exactly these).
    assert set(read_params_file(name)) <= set(TrainConfig.keys())
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(cfg.model_type, ModelConfig.from_params(cfg.to_dict(), 13_000))
    assert model.num_parameters()["total"] > 0


@pytest.mark.parametrize("backpack,transformer", PAIRS)
def test_paired_configs_differ_only_where_allowed(backpack, transformer):
    a, b = read_params_file(backpack), read_params_file(transformer)
    differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differing <= {"run_name", "out_dir", "model_type", "n_senses"}
    assert a["model_type"] == "backpack" and b["model_type"] == "transformer"


def test_seed_values_and_defaults_match():
    cfg = load_params("train_europarl_scratch")
    assert (cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_senses) == (512, 6, 6, 384, 16)
    assert (cfg.batch_size, cfg.learning_rate, cfg.max_iters, cfg.weight_decay) == (32, 3e-4, 50000, 0.1)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.checkpoint_interval) == (500, 200, 2500)
    # The dataclass defaults are the seed's Backpack run, so a notebook without a file agrees.
    assert cfg == TrainConfig()


def test_table_and_mini_presets():
    assert load_params("backpack_table").sense_source == "table"
    for name in ("backpack_mini", "transformer_mini"):
        cfg = load_params(name)
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (8, 640, 8)


def test_every_field_has_a_docstring():
    docs = field_docs()
    assert set(docs) == set(TrainConfig.keys())
    assert all(len(d) > 10 for d in docs.values())


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_params("tiny_backpack").replace(probe_words=["vote", "Parliament"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_params(str(path)) == cfg


def test_all_problems_in_one_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lerning_rate: 1.0e-3\nbatch_size: lots\ncompile: maybe\ndtype: fp16\n"
                    "n_embd: 100\nn_head: 3\nlanguages: en,xx\ndropout: 1.5\n")
    with pytest.raises(UserError) as err:
        load_params(str(path))
    msg = str(err.value)
    for part in ("8 problems", "unknown key 'lerning_rate' (did you mean 'learning_rate'?)",
                 "batch_size: expected an integer, got 'lots'",
                 "compile: expected true, false or auto", "dtype: 'fp16' is not one of",
                 "n_embd (100) must be divisible by n_head (3)", "languages: xx not in Europarl",
                 "dropout must be in [0, 1) (got 1.5)", "valid keys: run_name, model_type"):
        assert part in msg


def test_notebook_namespace():
    # papermill injects the YAML's keys as variables beside the notebook's own ones
    namespace = {**read_params_file("tiny_backpack"), "plt": object(), "_": 1}
    assert TrainConfig.from_namespace(namespace) == load_params("tiny_backpack")


def test_type_coercion_rules():
    # PyYAML reads 1e-3 as a string and papermill/CLI values arrive as text: accept them.
    cfg = TrainConfig.from_dict({"learning_rate": "1e-3", "min_lr": 0, "max_iters": "5e4",
                                 "compile": "yes", "stop_after": "null", "probe_words": "a, b"})
    assert (cfg.learning_rate, cfg.min_lr, cfg.max_iters, cfg.compile) == (1e-3, 0.0, 50000, True)
    assert cfg.stop_after is None and cfg.probe_words == ["a", "b"]
    with pytest.raises(UserError, match="batch_size: expected an integer, got 3.5"):
        TrainConfig.from_dict({"batch_size": 3.5})
    with pytest.raises(UserError, match="bias: expected true or false, got 1"):
        TrainConfig.from_dict({"bias": 1})
    with pytest.raises(UserError, match="n_layer: expected an integer, got True"):
        TrainConfig.from_dict({"n_layer": True})


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(UserError) as err:
        load_params("train_europarl_scrach")
    assert "Did you mean 'train_europarl_scratch'?" in str(err.value)
    assert "tiny_backpack" in str(err.value)
    assert params_path("tiny_backpack") == params_dir() / "tiny_backpack.yaml"


def test_command_line_wins_over_yaml():
    cfg = config_from_argv([
        "--config", "train_europarl_scratch", "--model_type", "transformer",
        "--learning_rate", "1e-3", "--compile", "--batch_size=4", "--out-dir", "out/x",
    ])
    assert (cfg.model_type, cfg.learning_rate, cfg.compile, cfg.batch_size, cfg.out_dir) == (
        "transformer", 1e-3, True, 4, "out/x")
    assert cfg.n_layer == 6  # untouched keys keep the file's values


@pytest.mark.parametrize("args,expected", [
    (["--compile"], True), (["--compile", "true"], True), (["--compile=false"], False),
    (["--compile", "--no-compile"], False), (["--no_compile"], False), ([], False),
])
def test_boolean_flags(args, expected):
    assert config_from_argv(["--config", "tiny_backpack", *args]).compile is expected


def test_command_line_problems_are_named_as_flags():
    with pytest.raises(UserError) as err:
        config_from_argv(["--config", "tiny_backpack", "--batch_size", "x", "--dtype", "fp8"])
    assert "--batch_size: expected an integer" in str(err.value)
    assert "--dtype: 'fp8' is not one of float32, bfloat16, float16" in str(err.value)


def test_unknown_flag_suggests_the_key():
    with pytest.raises(UserError, match=r"--lerning_rate.*did you mean --learning_rate\?"):
        config_from_argv(["--lerning_rate", "1e-3"])
    with pytest.raises(UserError, match="unrecognized"):
        config_from_argv(["--comp"])  # no prefix matching: --comp is not --compile


def test_model_shape_keys():
    assert set(model_shape_keys("transformer")) == {
        "model_type", "block_size", "n_layer", "n_head", "n_embd", "bias",
        "scale_attn_by_inverse_layer_idx"}
    assert set(model_shape_keys("backpack")) - set(model_shape_keys("transformer")) == {
        "n_senses", "sense_source"}
    schedule = {"max_iters", "eval_interval", "checkpoint_interval", "learning_rate"}
    assert not schedule & set(model_shape_keys())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(model_shape_keys()) <= fields


def test_params_get_prints_validated_values_for_shell_scripts(tmp_path, capsys):
    """`python -m backpack_nb.params get` (what gcp_vm.sh reads params files with)."""
    from backpack_nb.params import main

    assert main(["get", "train_europarl_scratch", "out_dir", "compile", "bias", "dropout",
                 "probe_words"]) == 0
    assert capsys.readouterr().out.split("\n") == ["out/backpack_full", "", "false", "0.1", "", ""]
    custom = tmp_path / "mine.yaml"
    custom.write_text("max_iters: 10\nprobe_words: [vote, loi]\n")
    assert main(["get", str(custom), "run_name", "probe_words", "max_iters", "--only-set"]) == 0
    assert capsys.readouterr().out.split("\n") == ["", "vote,loi", "10", ""]
    for argv, words in ((["get", "tiny_backpack", "out_dirr"], "did you mean out_dir?"),
                        (["get", "tiny_backpak", "out_dir"], "Did you mean 'tiny_backpack'?"),
                        (["get", str(custom)], "the following arguments are required")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and words in err and "Traceback" not in err
    custom.write_text("dropout: 2\n")
    with pytest.raises(SystemExit):
        main(["get", str(custom), "dropout"])
    assert "dropout" in capsys.readouterr().err
