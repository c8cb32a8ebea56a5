"""The CRNN: find weights -> read and check the model card -> build and load -> embed.

Reading a card is plain JSON (the plugin needs the genre labels at start-up); Keras and
TensorFlow are imported only when a model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import N_MELS, WINDOW_FRAMES
from .errors import ModelError
from .features import MSD_PARAMS, PARAMS, front_end_for

CARD_NAME = "crnn.json"
WEIGHTS_NAME = "crnn.weights.h5"
CARD_FORMAT = 1
POOLS = ((2, 2), (3, 3), (4, 4), (4, 4))
DEFAULT_ARCHITECTURE = {"conv_filters": [68, 137, 137, 137], "gru_units": 68, "dropout": 0.1}


# A plain install analyses with onnxruntime; training and the Keras runtime need TensorFlow.
NEEDS_TRAIN = "this needs TensorFlow, which a plain install leaves out: pip install beets-crnn[train]"

# What TensorFlow's C++ logger prints while it loads, whatever TF_CPP_MIN_LOG_LEVEL says.
_IMPORT_NOTICES = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog()")


def quiet_tensorflow() -> None:
    """Settings TensorFlow reads when it loads; a user's own environment wins.

    oneDNN kernels make the CRNN about 30% cheaper on CPU (bench/embed.py), with outputs
    equal to float32 round-off, so they are on unless TF_ENABLE_ONEDNN_OPTS=0.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def require_tensorflow() -> None:
    """Fail at once, with the install hint, where a command will need TensorFlow later on."""
    from importlib.util import find_spec

    if find_spec("tensorflow") is None or find_spec("keras") is None:
        raise ModelError(NEEDS_TRAIN)


def import_tensorflow():
    """Import TensorFlow and Keras without their load-time notices reaching the terminal.

    The oneDNN notice comes from a C++ logger that ignores TF_CPP_MIN_LOG_LEVEL, so file
    descriptor 2 is captured while the modules load; every other line is passed on.
    """
    quiet_tensorflow()
    if sys.modules.get("tensorflow") is not None and sys.modules.get("keras") is not None:
        return sys.modules["tensorflow"]
    require_tensorflow()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to keep clean
        import keras  # noqa: F401
        import tensorflow

        return tensorflow
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            passed = [line for line in buf.read().decode("utf-8", "replace").splitlines()
                      if line.strip() and not any(n in line for n in _IMPORT_NOTICES)]
            if passed:
                sys.stderr.write("\n".join(passed) + "\n")
                sys.stderr.flush()
    return tensorflow


def default_weights_dir() -> Path:
    """The shipped model_weights/: the repo folder in a checkout, package data when installed.

    A checkout's own folder comes first, so that code run from a checkout (a git worktree beside
    an editable install of another one, say) never uses or writes the other one's model.
    """
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.cfg").is_file() and (checkout / "model_weights" / CARD_NAME).is_file():
        return checkout / "model_weights"
    try:
        from importlib.resources import files

        path = Path(str(files("beetsplug.crnn.model_weights")))
        if (path / CARD_NAME).is_file():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "model_weights"


def find_card(path=None) -> Path:
    """The card file for a configured path (a card .json or a folder holding crnn.json)."""
    base = Path(os.path.expanduser(os.fspath(path))) if path else default_weights_dir()
    card = base / CARD_NAME if base.is_dir() else base
    if not card.is_file():
        raise ModelError(f"no model card at {card} (set crnn.model to a folder holding {CARD_NAME}, or train one)")
    return card


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelCard:
    model_id: str
    genres: list
    weights: Path
    sha256: str
    architecture: dict = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    features: dict = field(default_factory=lambda: dict(PARAMS))
    extra: dict = field(default_factory=dict)  # training data, command, metrics: carried, not interpreted
    tags: list = field(default_factory=list)  # names of the tag head's outputs (distilled from a teacher), if any
    onnx: dict | None = None  # the ONNX export beside the weights (file, sha256, check), when there is one

    @classmethod
    def load(cls, path=None) -> "ModelCard":
        card_path = find_card(path)
        try:
            data = json.loads(card_path.read_text("utf-8"))
            if data.get("format") != CARD_FORMAT:
                raise ModelError(f"model card {card_path}: unsupported format {data.get('format')!r}")
            card = cls(
                model_id=str(data["model_id"]),
                genres=[str(g) for g in data["genres"]],
                weights=card_path.parent / data["weights"],
                sha256=str(data["sha256"]),
                architecture=dict(data["architecture"]),
                features=dict(data["features"]),
                extra={k: v for k, v in data.items() if k not in _CARD_KEYS},
                tags=[str(t) for t in data.get("tags", [])],
                onnx=dict(data["onnx"]) if data.get("onnx") else None,
            )
        except ModelError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"model card {card_path} is unreadable: {exc!r}") from None
        if not card.genres:
            raise ModelError(f"model card {card_path} lists no genres")
        if front_end_for(card.features) is None:
            diff = sorted(k for k in set(PARAMS) | set(card.features) if PARAMS.get(k) != card.features.get(k))
            raise ModelError(f"model card {card_path}: preprocessing differs from this version ({', '.join(diff)})")
        if card.family not in FAMILIES:
            raise ModelError(f"model card {card_path}: unknown model family {card.family!r}")
        return card

    @property
    def family(self) -> str:
        """The architecture the card describes: our own CRNN (``crnn``) or the MSD CRNN's (``msd-crnn``)."""
        return family_of(self.architecture)

    @property
    def front(self):
        """The front end the model hears through (``features.FrontEnd``)."""
        return front_end_for(self.features)

    def to_json(self) -> dict:
        data = {
            "format": CARD_FORMAT,
            "model_id": self.model_id,
            "genres": list(self.genres),
            "weights": self.weights.name,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "features": self.features,
        }
        if self.tags:
            data["tags"] = list(self.tags)
        if self.onnx:
            data["onnx"] = dict(self.onnx)
        data.update(self.extra)
        return data

    def save(self, card_path) -> None:
        card_path = Path(card_path)
        tmp = card_path.with_name(card_path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n", "utf-8")
        os.replace(tmp, card_path)

    def verify(self) -> None:
        """The weights file must be the one the card describes."""
        if not self.weights.is_file():
            raise ModelError(f"weights file {self.weights} is missing")
        actual = sha256_of(self.weights)
        if actual != self.sha256:
            raise ModelError(f"weights file {self.weights} does not match its card (sha256 {actual[:12]}…, card says {self.sha256[:12]}…)")


    @property
    def onnx_path(self) -> Path | None:
        """The ONNX export the card records, or None when it records none."""
        return self.weights.parent / self.onnx["file"] if self.onnx and self.onnx.get("file") else None

    def verify_onnx(self) -> Path:
        """The ONNX file must be the one the card records (checked against the Keras model at export)."""
        path = self.onnx_path
        if path is None:
            raise ModelError(f"model {self.model_id} has no ONNX export (run crnn-export {self.weights.parent})")
        if not path.is_file():
            raise ModelError(f"ONNX file {path} is missing (run crnn-export {self.weights.parent})")
        actual = sha256_of(path)
        if actual != self.onnx.get("sha256"):
            raise ModelError(f"ONNX file {path} does not match its card (sha256 {actual[:12]}…, card says "
                             f"{str(self.onnx.get('sha256'))[:12]}…); run crnn-export {self.weights.parent}")
        return path


_CARD_KEYS = {"format", "model_id", "genres", "weights", "sha256", "architecture", "features", "tags", "onnx"}


def build(n_genres: int, conv_filters=(68, 137, 137, 137), gru_units=68, dropout=0.1, frames=WINDOW_FRAMES, n_tags=0,
          projection=False):
    """The paper's CRNN. Returns a Keras model mapping model input (b, 96, frames, 1) to (embedding, probs).

    ``frames=None`` takes inputs of any length (training on short crops); the weights are the same.

    With ``n_tags`` a second sigmoid head on the same embedding predicts a teacher's tags
    (distillation); the outputs are then (embedding, probs, tags).

    With ``projection`` a square linear map follows the last GRU (``wccn`` fits it so that versions
    of a clip land together); the embedding is its output, and the heads read that.
    """
    import_tensorflow()
    import keras
    from keras import layers

    if len(conv_filters) != len(POOLS):
        raise ModelError(f"the CRNN has {len(POOLS)} conv layers, got {len(conv_filters)} widths")
    inp = keras.Input((N_MELS, frames, 1), name="logmel")
    # Per-band standardisation learnt from the data, so the dB scale needs no hand tuning.
    x = layers.BatchNormalization(axis=1, name="input_norm")(inp)
    for i, (width, pool) in enumerate(zip(conv_filters, POOLS), 1):
        x = layers.Conv2D(int(width), 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(pool, name=f"pool{i}")(x)
        x = layers.Dropout(dropout, name=f"drop{i}")(x)
    # Frequency has pooled down to 1: the rest is a sequence over time (of any length with frames=None).
    steps, width = x.shape[2], x.shape[3]
    x = layers.Reshape((-1 if steps is None else steps, width), name="to_sequence")(x)
    x = layers.GRU(int(gru_units), return_sequences=True, name="gru1")(x)
    emb = layers.GRU(int(gru_units), name="gru2")(x)
    if projection:
        emb = layers.Dense(int(gru_units), use_bias=False, name="projection")(emb)
    probs = layers.Dense(n_genres, activation="sigmoid", name="genres")(emb)
    outputs = [emb, probs]
    if n_tags:
        outputs.append(layers.Dense(int(n_tags), activation="sigmoid", name="tags")(emb))
    return keras.Model(inp, outputs, name="crnn")


FAMILY_FEATURES = {"crnn": PARAMS, "msd-crnn": MSD_PARAMS}  # each family, and the front end it was built to hear
FAMILIES = tuple(FAMILY_FEATURES)


def family_of(arch: dict) -> str:
    """An architecture's family; cards from before families were named are our own CRNN's."""
    return str(arch.get("family", "crnn"))


def family_features(arch: dict) -> dict:
    """The front end of an architecture's family: what a card says when nothing else is asked for."""
    return dict(FAMILY_FEATURES[family_of(arch)])


def build_for(card: ModelCard):
    arch = card.architecture
    if card.family == "msd-crnn":
        from . import msd

        import_tensorflow()
        return msd.build(len(card.genres), len(card.tags), dropout=arch.get("dropout", 0.1),
                         gru_dropout=arch.get("gru_dropout", 0.3), projection=bool(arch.get("projection")),
                         genre_activation=arch.get("genre_activation", "sigmoid"),
                         genre_input=arch.get("genre_input", "state"))
    return build(len(card.genres), arch["conv_filters"], arch["gru_units"], arch.get("dropout", 0.1),
                 n_tags=len(card.tags), projection=bool(arch.get("projection")))


def l2_normalise(v: np.ndarray, axis=-1) -> np.ndarray:
    norm = np.linalg.norm(v, axis=axis, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)


def pool_track(embeddings: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One track from its windows: mean of unit window embeddings, renormalised; mean probabilities."""
    return l2_normalise(l2_normalise(embeddings).mean(axis=0)), probs.mean(axis=0).astype(np.float32)


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); elsewhere it is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return precision


class Embedder:
    """A loaded CRNN with one compiled inference function; call it with batches of log-mels.

    ``precision="bfloat16"`` computes in bfloat16 with float32 weights (Keras mixed precision):
    about a quarter less CPU on CPUs with native bfloat16, outputs within ~1e-2 of float32,
    the order of the float16 the embeddings are stored in.
    """

    def __init__(self, card: ModelCard, batch_size: int = 8, precision: str = "float32"):
        card.verify()
        self.card = card
        self.front = card.front
        self.batch_size = batch_size
        self.precision = resolve_precision(precision)
        tf = import_tensorflow()
        import keras

        previous = keras.mixed_precision.global_policy()
        if self.precision == "bfloat16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            self.model = build_for(card)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        try:
            self.model.load_weights(str(card.weights))
        except Exception as exc:
            raise ModelError(f"weights {card.weights} do not fit the architecture in the card: {exc}") from None
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, N_MELS, WINDOW_FRAMES, 1], tf.float32)], reduce_retracing=True)
        def infer(x):
            outputs = model(x, training=False)
            return tuple(tf.cast(o, tf.float32) for o in outputs)

        self._infer = infer

    @classmethod
    def load(cls, path=None, **kwargs) -> "Embedder":
        return cls(ModelCard.load(path), **kwargs)

    def __call__(self, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-mels (n, 96, 1366) -> unit embeddings (n, d) and genre probabilities (n, g)."""
        emb, probs, _ = self.analyse(mels)
        return emb, probs

    def analyse(self, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Log-mels -> (unit embeddings, genre probabilities, tag probabilities or None)."""
        return _gather(self._outputs(mels), bool(self.card.tags))

    def raw_embeddings(self, mels: np.ndarray) -> np.ndarray:
        """Log-mels -> the embedding as the model outputs it, before normalisation (what ``wccn`` measures)."""
        return np.concatenate([o[0] for o in self._outputs(mels)]).astype(np.float32)

    def _outputs(self, mels: np.ndarray) -> list:
        x = self.front.model_input(mels)
        return [[o.numpy() for o in self._infer(x[i : i + self.batch_size, :, :, None])]
                for i in range(0, len(x), self.batch_size)]


def _gather(outs, has_tags: bool):
    """Per-call model outputs [(embedding, genres[, tags]), ...] -> (unit embeddings, genre probabilities,
    tag probabilities or None), whichever runtime produced them."""
    emb = l2_normalise(np.concatenate([o[0] for o in outs]))
    probs = np.concatenate([o[1] for o in outs]).astype(np.float32)
    tags = np.concatenate([o[2] for o in outs]).astype(np.float32) if has_tags else None
    return emb, probs, tags


RUNTIMES = ("auto", "onnx", "keras")

# One onnxruntime session per (file, threads) in a process: loading parses and optimises the graph.
_SESSIONS: dict = {}
_SESSIONS_LOCK = threading.Lock()


def _onnx_session(path: Path, threads: int):
    key = (str(path), threads)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            # "extended" fuses Conv+Relu; "all" adds the NCHWc layout change, which made this model
            # ~15% dearer per window on an AVX-512 CPU (bench/runtimes.py)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            # The memory arena stays on: without it every call maps and faults in fresh buffers
            # (~40% more CPU per window). One window per call keeps what it holds small.
            try:
                _SESSIONS[key] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise ModelError(f"ONNX file {path} cannot be loaded: {_first_line(exc)}") from None
        return _SESSIONS[key]


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxEmbedder:
    """The card's ONNX export on onnxruntime: the same outputs as ``Embedder`` in float32, without TensorFlow.

    onnxruntime releases the GIL while it computes, so the analysis pipeline calls this from its
    decoding threads (``in_workers``); ``threads`` is onnxruntime's own per call (0 = all cores).
    It runs one window per call: on onnxruntime that costs the same per window as a batch of 4
    (0.10 CPU s, bench/runtimes.py), and it keeps the buffers that each concurrent call holds
    (~70 MB per window for conv1's output) small, so crnn.batch_size is for the Keras runtime.
    """

    in_workers = True
    precision = "float32"
    batch_size = 1

    def __init__(self, card: ModelCard, threads: int = 0):
        self.card = card
        self.front = card.front
        path = card.verify_onnx()
        self._session = _onnx_session(path, int(threads))
        outputs = {o.name: o.shape[-1] for o in self._session.get_outputs()}
        wanted = {"embedding": card.architecture.get("gru_units"), "genres": len(card.genres)}
        if card.tags:
            wanted["tags"] = len(card.tags)
        wrong = [f"{name} has {outputs.get(name, 'no')} outputs, the card says {n}"
                 for name, n in wanted.items() if outputs.get(name) != n]
        if wrong:
            raise ModelError(f"{path} and its card do not fit the architecture ({'; '.join(wrong)}); "
                             f"run crnn-export {card.weights.parent}")
        self._names = list(wanted)

    def __call__(self, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb, probs, _ = self.analyse(mels)
        return emb, probs

    def analyse(self, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Log-mels -> (unit embeddings, genre probabilities, tag probabilities or None)."""
        x = self.front.model_input(mels)
        outs = [self._session.run(self._names, {"logmel": x[i : i + 1]}) for i in range(len(x))]
        return _gather(outs, bool(self.card.tags))


def resolve_runtime(card: ModelCard, precision: str = "auto", runtime: str = "auto") -> str:
    """``onnx`` or ``keras`` for this card: auto = ONNX when the card records an export, unless bfloat16 is asked for
    (onnxruntime computes the model in float32 only)."""
    if runtime not in RUNTIMES:
        raise ModelError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if runtime == "auto":
        return "keras" if precision == "bfloat16" or not card.onnx else "onnx"
    if runtime == "onnx" and precision == "bfloat16":
        raise ModelError("precision bfloat16 needs runtime keras (the ONNX runtime computes in float32)")
    return runtime


def embedder_for(card: ModelCard, batch_size: int = 8, precision: str = "auto", runtime: str = "auto",
                 threads: int = 0):
    """The embedder a command uses: ONNX when the card has a verified export (see ``resolve_runtime``), else Keras."""
    if resolve_runtime(card, precision, runtime) == "onnx":
        card.verify()
        return OnnxEmbedder(card, threads=threads)
    return Embedder(card, batch_size=batch_size, precision=precision)
