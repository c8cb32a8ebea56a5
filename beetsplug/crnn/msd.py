"""The MSD CRNN family: Choi, Fazekas, Sandler and Cho (ICASSP 2017), trained on the Million Song Dataset.

Its layers as in the released Keras 1 file, rebuilt in Keras 3 (channels last), and ``port`` to load
that file. Differences from our own family that matter: ELU, biased convolutions, ``bn_0_freq`` (a
batch norm with one parameter per padded time frame), and Keras 1 GRUs (gates hard_sigmoid =
clip(0.2 x + 0.5, 0, 1), the reset gate applied before the recurrent matmul).

The released weights are MIT licensed, copyright (c) 2016 Keunwoo Choi; the notice travels with
every model derived from them (see the model card and README credits).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ModelError

FAMILY = "msd-crnn"
CONV_FILTERS = (64, 128, 128, 128)
POOLS = ((2, 2), (3, 3), (4, 4), (4, 4))
GRU_UNITS = 32
PAD_FRAMES = 37  # zero frames before and after in time: 1366 -> 1440
BN_EPS = 1e-6  # Keras 1 divided by (running_std + 1e-6)
WEIGHTS_FILE = "music_tagger_crnn_weights_tensorflow.h5"
SHA256 = "df63638de9f3113780768181670c554f122fbd1297c63c065836d70a251115a8"
TAGS = ["rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
        "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul",
        "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill", "instrumental", "punk", "oldies",
        "blues", "hard rock", "ambient", "acoustic", "experimental", "female vocalist", "guitar", "Hip-Hop",
        "70s", "party", "country", "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal",
        "Progressive rock", "60s", "rnb", "indie pop", "sad", "House", "happy"]
CREDIT = ("Derived from the MSD CRNN of Keunwoo Choi, György Fazekas, Mark Sandler and Kyunghyun Cho, "
          "'Convolutional recurrent neural networks for music classification', ICASSP 2017, trained on the "
          "Million Song Dataset; weights from keunwoochoi/music-auto_tagging-keras, MIT licence, "
          "copyright (c) 2016 Keunwoo Choi.")
LICENSE_FILE = "LICENSE-choi2017-msd-crnn.txt"
# The released weights' notice (MIT); it travels with every model derived from them.
LICENSE = """MIT License

Copyright (c) 2016 Keunwoo Choi

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
GENRE_INPUTS = ("state", "state+conv_mean")
UNFREEZE = ("none", "head", "gru", "conv4")  # what fine-tuning trains: none (a genre head fitted on the kept network), head, gru, or conv4 and up
ARCHITECTURE = {"family": FAMILY, "conv_filters": list(CONV_FILTERS), "gru_units": GRU_UNITS, "dropout": 0.1,
                "gru_dropout": 0.3}


def default_weights_path() -> Path:
    """Where a checkout finds the released file: ../shared/pretrained beside the project root, or
    $BEETS_CRNN_MSD_WEIGHTS."""
    env = os.environ.get("BEETS_CRNN_MSD_WEIGHTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "pretrained" / "choi2017-msd-crnn" / WEIGHTS_FILE


def keras1_hard_sigmoid(x):
    """Keras 1's hard sigmoid (Keras 3's is x/6 + 0.5, which would change every gate)."""
    from keras import ops

    return ops.clip(0.2 * x + 0.5, 0.0, 1.0)


def build(n_genres: int, n_tags: int = len(TAGS), frames: int = 1366, dropout: float = 0.1, gru_dropout: float = 0.3,
          projection: bool = False, genre_activation: str = "sigmoid", genre_input: str = "state"):
    """The MSD CRNN with a genre head beside its tag head: input (b, 96, 1366, 1) standardised log-mel;
    outputs (embedding = gru2's 32-d state, genre probabilities[, tag probabilities]).

    ``genre_input`` (``GENRE_INPUTS``): what the genre head reads: the state, or the state beside the
    conv stack's output averaged over time (128-d, ``conv_mean``), which keeps timbre the GRUs summarise away.
    The tag head always reads the state, as released."""
    import keras
    from keras import layers

    inp = keras.Input((96, frames, 1), name="logmel")
    x = layers.ZeroPadding2D(((0, 0), (PAD_FRAMES, PAD_FRAMES)), name="zeropadding2d_1")(inp)
    x = layers.BatchNormalization(axis=2, epsilon=0.0, name="bn_0_freq")(x)
    for i, (width, pool) in enumerate(zip(CONV_FILTERS, POOLS), 1):
        x = layers.Conv2D(width, 3, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(axis=-1, epsilon=0.0, name=f"bn{i}")(x)
        x = layers.ELU(name=f"elu{i}")(x)
        x = layers.MaxPooling2D(pool, name=f"pool{i}")(x)
        x = layers.Dropout(dropout, name=f"drop{i}")(x)
    steps, width = x.shape[2], x.shape[3]
    seq = layers.Reshape((steps, width), name="to_sequence")(x)
    gru = dict(activation="tanh", recurrent_activation=keras1_hard_sigmoid, reset_after=False)
    x = layers.GRU(GRU_UNITS, return_sequences=True, name="gru1", **gru)(seq)
    emb = layers.GRU(GRU_UNITS, name="gru2", **gru)(x)
    if projection:
        emb = layers.Dense(GRU_UNITS, use_bias=False, name="projection")(emb)
    top = layers.Dropout(gru_dropout, name="drop_gru")(emb)
    genre_in = genre_head_input(top, seq, genre_input)
    # sigmoid (trained heads: genres of several sources) or softmax (a probe fitted on the frozen state)
    outputs = [emb, layers.Dense(n_genres, activation=genre_activation, name="genres")(genre_in)]
    if n_tags:
        outputs.append(layers.Dense(n_tags, activation="sigmoid", name="tags")(top))
    return keras.Model(inp, outputs, name="msd_crnn")


def genre_head_input(state, sequence, genre_input: str):
    """The genre head's input (see ``build``); shared with fine-tuning's top so both name layers alike."""
    from keras import layers

    if genre_input not in GENRE_INPUTS:
        raise ModelError(f"unknown genre_input {genre_input!r} (one of {', '.join(GENRE_INPUTS)})")
    if genre_input == "state":
        return state
    conv_mean = layers.GlobalAveragePooling1D(name="conv_mean")(sequence)
    return layers.Concatenate(name="genre_input")([state, conv_mean])


def read_released(path=None) -> dict:
    """The released Keras 1 file as {keras 3 layer name: [arrays in Keras 3 order]}."""
    import h5py

    path = Path(path) if path else default_weights_path()
    if not path.is_file():
        raise ModelError(f"the MSD CRNN weights are not at {path}: get {WEIGHTS_FILE} from "
                         "keunwoochoi/music-auto_tagging-keras and pass its path (or set BEETS_CRNN_MSD_WEIGHTS)")
    out = {}
    try:
        with h5py.File(path, "r") as f:
            def get(layer, param):
                return np.asarray(f[layer][f"{layer}_{param}"], np.float32)

            for name in ["bn_0_freq"] + [f"bn{i}" for i in range(1, 5)]:
                std = get(name, "running_std_1:0")
                out[name] = [get(name, "gamma_1:0"), get(name, "beta_1:0"), get(name, "running_mean_1:0"),
                             (std + BN_EPS) ** 2]
            for i in range(1, 5):
                # stored (out, in, 3, 3), Theano-style; Keras 3 wants (3, 3, in, out), not flipped
                out[f"conv{i}"] = [get(f"conv{i}", "W_1:0").transpose(2, 3, 1, 0), get(f"conv{i}", "b_1:0")]
            for g in ("gru1", "gru2"):
                w = np.concatenate([get(g, f"W_{k}:0") for k in "zrh"], axis=1)
                u = np.concatenate([get(g, f"U_{k}:0") for k in "zrh"], axis=1)
                b = np.concatenate([get(g, f"b_{k}:0") for k in "zrh"])
                out[g] = [w, u, b]
            out["tags"] = [get("output", "W_1:0"), get("output", "b_1:0")]
    except (OSError, KeyError) as exc:
        raise ModelError(f"{path} is not the released MSD CRNN file: {exc}") from None
    return out


def port(net, path=None) -> None:
    """Load the released weights into ``net`` (built by ``build``): every layer but the genre head."""
    weights = read_released(path)
    layers = {layer.name: layer for layer in net.layers}
    for name, values in weights.items():
        if name in layers:
            layers[name].set_weights(values)


def build_pretrained(genres, path=None, tags: bool = True, genre_activation: str = "sigmoid",
                     genre_input: str = "state"):
    """The released network with a fresh genre head for ``genres`` (its tag head kept when ``tags``)."""
    from .model import import_tensorflow

    import_tensorflow()
    net = build(len(genres), len(TAGS) if tags else 0, genre_activation=genre_activation, genre_input=genre_input)
    port(net, path)
    return net
