"""The training and evaluation command lines: what they refuse, and that --help shows what parses."""

from __future__ import annotations

import pytest

from beetsplug.crnn.errors import CrnnError
from beetsplug.crnn.training import evaluate
from beetsplug.crnn.model import ModelCard, default_weights_dir
from conftest import BeetsEnv


def test_crnn_eval_update_card_needs_a_model(tmp_path, capsys):
    """--update-card without --model would rewrite the shipped model's card: refused before any work."""
    card = default_weights_dir() / "crnn.json"
    before = card.read_bytes()
    assert evaluate.main([str(tmp_path), "--update-card"]) == 1
    assert "--update-card writes into the model's card: name the model with --model DIR" in capsys.readouterr().err
    assert card.read_bytes() == before


def test_crnn_train_needs_out(tmp_path, capsys):
    """No default --out: one relative to the working directory could replace a checkout's model_weights/."""
    from beetsplug.crnn.training import train

    with pytest.raises(SystemExit) as exc:
        train.main([str(tmp_path)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_beet_crnntrain_data_files_the_model_in_the_config_directory(tmp_path, tiny_model):
    """`beet crnntrain DATA` without --out writes crnn_models/<model id> where the library form does."""
    from test_model import _tiny_dataset

    data = _tiny_dataset(tmp_path / "data")
    env = BeetsEnv(tmp_path / "beets", tiny_model.weights.parent)
    work = tmp_path / "work"
    work.mkdir()
    proc = env.run("crnntrain", str(data), "--cache", str(tmp_path / "c"), "--epochs", "1", "--max-steps", "1",
                   "--batch-size", "2", "--conv-filters", "4,4,4,4", "--gru-units", "4", cwd=work)
    folders = [p for p in (env.root / "crnn_models").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")
    card = ModelCard.load(folders[0])
    assert card.model_id == folders[0].name
    assert f"wrote model {card.model_id} to {folders[0]}" in proc.stdout
    assert list(work.iterdir()) == []  # nothing written where the command ran


def test_crnneval_has_one_parser_for_both_forms():
    """`beet crnneval --help` shows the parser that parses a QUERY and DATA alike; --library is defined once."""
    from beetsplug.crnn.training import library_eval
    from beetsplug.crnn.training.library_train import build_eval_parser, build_train_parser

    for parser in (build_eval_parser(), build_train_parser()):
        flags = [flag for action in parser._actions for flag in action.option_strings]
        assert flags.count("--library") == 1 and flags.count("--field") == 1
    parser = build_eval_parser()
    assert "--robustness" in parser.format_help() and "--update-card" in parser.format_help()
    ns = parser.parse_args(["genre:rock", "--split", "val", "--field", "style"])
    assert ns.args == ["genre:rock"] and ns.split == "val" and ns.field == "style"
    assert ns.cache is None and ns.windows is None  # each form fills its own
    with pytest.raises(CrnnError, match="--split on a library is test or val"):
        library_eval.eval_library(parser.parse_args(["--split", "train"]), [], None)
