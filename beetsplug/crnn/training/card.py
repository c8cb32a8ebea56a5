"""A trained model written out: weights, their ONNX export, and the model card naming both."""

from __future__ import annotations

from pathlib import Path

from ..errors import CrnnError
from ..model import CARD_NAME, WEIGHTS_NAME, ModelCard, family_features, sha256_of


def save_model(full_model, out_dir, genres, arch, extra, name="crnn", tags=(), log=None, features=None) -> ModelCard:
    """Write weights and their ONNX export, then the card naming both sha256 (the card is written last).

    The export is what a plain install analyses with; if it fails the model still works on the
    Keras runtime, so that is reported (``log``) rather than raised. ``features`` defaults to the
    front end of ``arch``'s family: an MSD-family model carded with the level-free front end would
    hear the wrong input without any error.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    tmp = out_dir / ("tmp-" + WEIGHTS_NAME)
    full_model.save_weights(str(tmp))
    tmp.replace(weights)
    sha = sha256_of(weights)
    extra = dict(extra, name=name)  # the family name, kept by models made from this one (crnn-wccn)
    card = ModelCard(model_id=f"{name}-{sha[:10]}", genres=list(genres), weights=weights, sha256=sha,
                     architecture=dict(arch), extra=extra, tags=list(tags),
                     features=dict(features) if features is not None else family_features(arch))
    try:
        from .export import export_card

        card.onnx = export_card(card)
    except (CrnnError, ImportError) as exc:
        (log or print)(f"ONNX export failed ({exc}); the model runs on the Keras runtime only (crnn-export retries)")
    card.save(out_dir / CARD_NAME)
    return card
