"""The training and evaluation command lines: what they refuse, and that --help shows what parses."""

from __future__ import annotations

from beetsplug.crnn import evaluate
from beetsplug.crnn.model import default_weights_dir


def test_crnn_eval_update_card_needs_a_model(tmp_path, capsys):
    """--update-card without --model would rewrite the shipped model's card: refused before any work."""
    card = default_weights_dir() / "crnn.json"
    before = card.read_bytes()
    assert evaluate.main([str(tmp_path), "--update-card"]) == 1
    assert "--update-card writes into the model's card: name the model with --model DIR" in capsys.readouterr().err
    assert card.read_bytes() == before
