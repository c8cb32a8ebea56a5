"""Export a trained CRNN to ONNX, so that analysis runs on onnxruntime without TensorFlow.

    python -m beetsplug.crnn.training.export [MODEL_DIR]      # or: crnn-export [MODEL_DIR]

The graph is written by hand with the ``onnx`` helper API from the Keras weights: each
batch-norm after a conv is folded into that conv, the two GRU layers become ONNX ``GRU``
ops (Keras 3 GRU: gates z, r, h and the reset gate applied after the recurrent matmul, which
is ONNX's gate order with ``linear_before_reset=1``), and the batch stays dynamic. The
export is checked against the Keras model on fixed inputs before the card records its
sha256; a model that does not match is not written.

Needs TensorFlow and onnx (``pip install beets-crnn[train]``); using the export needs neither.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ..audio import N_MELS, WINDOW_FRAMES
from ..errors import ModelError, command_main
from ..features import model_input
from ..model import CARD_NAME, POOLS, ModelCard, build_for, import_tensorflow, sha256_of

ONNX_NAME = "crnn.onnx"
OPSET = 17
ATOL = 1e-4  # float32: ONNX and Keras outputs may differ by this much at most on the check inputs
CHECK_SEED = 2024


def check_inputs(n: int = 4, front=None) -> np.ndarray:
    """Fixed model inputs (n, 96, 1366) for the export check: smooth random spectra, one of them silence.

    Made from a seed rather than audio, so the check needs no decoder and is the same every time.
    """
    rng = np.random.default_rng(CHECK_SEED)
    mels = []
    for i in range(n):
        if i == n - 1:
            mels.append(np.full((N_MELS, WINDOW_FRAMES), -200.0, np.float32))  # digital silence
            continue
        walk = np.cumsum(rng.normal(0, 1.5, (N_MELS, WINDOW_FRAMES)), axis=1)
        tilt = -np.linspace(0, 40, N_MELS)[:, None]
        mels.append((walk - walk.mean() + tilt + rng.normal(0, 6, (N_MELS, WINDOW_FRAMES))).astype(np.float32))
    return model_input(np.stack(mels), front)


def _bn(layer):
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in layer.get_weights())
    scale = gamma / np.sqrt(var + layer.epsilon)
    return scale, beta - mean * scale


def _gru_tensors(layer, name):
    """ONNX W, R, B of a Keras 3 GRU layer (gate order z, r, h on both sides) and its ONNX attributes.

    Our family: sigmoid gates, reset after the recurrent matmul (``linear_before_reset=1``). The MSD
    family: Keras 1 GRUs, hard-sigmoid gates clip(0.2 x + 0.5) (ONNX HardSigmoid, alpha 0.2, beta 0.5)
    and the reset gate before the matmul (``linear_before_reset=0``; Keras has no recurrent bias then).
    """
    from ..msd import keras1_hard_sigmoid

    if not layer.use_bias or layer.activation.__name__ != "tanh":
        raise ModelError(f"{name}: only tanh GRUs with biases can be exported")
    kernel, recurrent, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
    w = kernel.T[None]  # (1, 3u, input)
    r = recurrent.T[None]  # (1, 3u, u)
    if layer.reset_after and layer.recurrent_activation.__name__ == "sigmoid":
        # Keras: bias (2, 3u) = [input bias, recurrent bias]
        b = np.concatenate([bias[0], bias[1]])[None]  # (1, 6u): Wb then Rb
        return w, r, b, {"linear_before_reset": 1}
    if not layer.reset_after and layer.recurrent_activation is keras1_hard_sigmoid:
        b = np.concatenate([bias, np.zeros_like(bias)])[None]
        return w, r, b, {"linear_before_reset": 0, "activations": ["HardSigmoid", "Tanh"],
                         "activation_alpha": [0.2], "activation_beta": [0.5]}
    raise ModelError(f"{name}: only sigmoid GRUs (reset after) or Keras 1 hard-sigmoid GRUs (reset before) "
                     "can be exported")


def to_onnx(net):
    """The Keras CRNN as an ONNX ModelProto: input ``logmel`` (batch, 96, 1366) = model_input's output;
    outputs ``embedding`` (not yet unit length), ``genres`` and, with a tag head, ``tags``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    layer = {l.name: l for l in net.layers}
    const("ax1", np.array([1], np.int64))
    const("ax2", np.array([2], np.int64))
    const("ax0", np.array([0], np.int64))
    # (b, 96, 1366) -> NCHW (b, 1, 96, 1366); per-band input norm as a multiply-add (it cannot fold
    # into conv1: the conv's zero padding would then no longer be zero after the norm)
    nodes.append(helper.make_node("Unsqueeze", ["logmel", "ax1"], ["x0"]))
    msd = "bn_0_freq" in layer
    if msd:  # the MSD CRNN: 37 zero frames each side in time, then a norm per (padded) time frame
        from ..msd import PAD_FRAMES

        const("time_pads", np.array([0, 0, 0, PAD_FRAMES, 0, 0, 0, PAD_FRAMES], np.int64))
        nodes.append(helper.make_node("Pad", ["x0", "time_pads"], ["x0p"]))
        scale, shift = _bn(layer["bn_0_freq"])
        const("in_scale", scale.astype(np.float32).reshape(1, 1, 1, -1))
        const("in_shift", shift.astype(np.float32).reshape(1, 1, 1, -1))
        nodes.append(helper.make_node("Mul", ["x0p", "in_scale"], ["x0s"]))
    else:
        scale, shift = _bn(layer["input_norm"])
        const("in_scale", scale.astype(np.float32).reshape(1, 1, N_MELS, 1))
        const("in_shift", shift.astype(np.float32).reshape(1, 1, N_MELS, 1))
        nodes.append(helper.make_node("Mul", ["x0", "in_scale"], ["x0s"]))
    nodes.append(helper.make_node("Add", ["x0s", "in_shift"], ["x"]))
    x = "x"
    for i, pool in enumerate(POOLS, 1):
        conv = layer[f"conv{i}"].get_weights()
        kernel = np.asarray(conv[0], np.float64)  # (kh, kw, in, out)
        bias = np.asarray(conv[1], np.float64) if len(conv) > 1 else 0.0
        scale, shift = _bn(layer[f"bn{i}"])
        w = (kernel * scale).transpose(3, 2, 0, 1).astype(np.float32)  # (out, in, kh, kw), bn folded
        const(f"conv{i}_w", w)
        const(f"conv{i}_b", (bias * scale + shift).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, f"conv{i}_w", f"conv{i}_b"], [f"c{i}"], kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Elu" if msd else "Relu", [f"c{i}"], [f"r{i}"]))
        nodes.append(helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=list(pool), strides=list(pool)))
        x = f"p{i}"
    # (b, C, 1, T) -> (T, b, C): a sequence over time for the GRUs
    nodes.append(helper.make_node("Squeeze", [x, "ax2"], ["seq_bct"]))
    nodes.append(helper.make_node("Transpose", ["seq_bct"], ["seq"], perm=[2, 0, 1]))
    units = int(layer["gru1"].units)
    for j, name in enumerate(("gru1", "gru2")):
        w, r, b, attrs = _gru_tensors(layer[name], name)
        inputs = ["seq" if j == 0 else "h1", const(f"{name}_W", w), const(f"{name}_R", r), const(f"{name}_B", b)]
        nodes.append(helper.make_node("GRU", inputs, [f"{name}_y", f"{name}_yh"], hidden_size=units, **attrs))
        if j == 0:  # (T, 1, b, u) -> (T, b, u): the whole sequence feeds gru2
            nodes.append(helper.make_node("Squeeze", ["gru1_y", "ax1"], ["h1"]))
    if "projection" in layer:  # crnn-wccn's map after the last GRU: the embedding is its output
        nodes.append(helper.make_node("Squeeze", ["gru2_yh", "ax0"], ["gru2_h"]))
        proj = np.asarray(layer["projection"].get_weights()[0], np.float32)
        nodes.append(helper.make_node("MatMul", ["gru2_h", const("projection_w", proj)], ["embedding"]))
    else:
        nodes.append(helper.make_node("Squeeze", ["gru2_yh", "ax0"], ["embedding"]))
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", units])]
    head_input = {"genres": "embedding", "tags": "embedding"}
    if "genre_input" in layer:  # the MSD genre head reading the state beside the conv sequence's time mean
        nodes.append(helper.make_node("ReduceMean", ["seq"], ["conv_mean"], axes=[0], keepdims=0))
        nodes.append(helper.make_node("Concat", ["embedding", "conv_mean"], ["genre_input"], axis=1))
        head_input["genres"] = "genre_input"
    for head in ("genres", "tags"):
        if head not in layer:
            continue
        kernel, bias = (np.asarray(v, np.float32) for v in layer[head].get_weights())
        nodes.append(helper.make_node("Gemm", [head_input[head], const(f"{head}_w", kernel), const(f"{head}_b", bias)],
                                      [f"{head}_logit"]))
        activation = layer[head].activation.__name__
        if activation not in ("sigmoid", "softmax"):
            raise ModelError(f"{head}: only sigmoid or softmax heads can be exported, not {activation}")
        nodes.append(helper.make_node("Sigmoid" if activation == "sigmoid" else "Softmax", [f"{head}_logit"], [head]))
        outputs.append(helper.make_tensor_value_info(head, TensorProto.FLOAT, ["batch", kernel.shape[1]]))
    graph = helper.make_graph(nodes, "crnn", [helper.make_tensor_value_info("logmel", TensorProto.FLOAT,
                                                                            ["batch", N_MELS, WINDOW_FRAMES])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="beets-crnn")
    model.ir_version = 8  # readable by onnxruntime 1.14 and later
    onnx.checker.check_model(model)
    return model


def keras_outputs(net, x: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(o, np.float32) for o in net(x[..., None], training=False)]


def export_model(net, card: ModelCard, x: np.ndarray | None = None) -> dict:
    """Write ``crnn.onnx`` beside the card's weights for the loaded Keras model ``net`` and check it.

    Returns the card's ``onnx`` block (file, sha256, opset, the check's largest difference); the
    caller saves the card. Raises ModelError (and writes nothing) when ONNX and Keras disagree.
    """
    import onnxruntime as ort

    x = check_inputs(front=card.front) if x is None else x
    proto = to_onnx(net)
    data = proto.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, {"logmel": x})
    want = keras_outputs(net, x)
    if len(got) != len(want):
        raise ModelError(f"ONNX export gives {len(got)} outputs, the Keras model {len(want)}")
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    if not diff <= ATOL:
        raise ModelError(f"ONNX export differs from the Keras model by {diff:.2g} (more than {ATOL:g}); not written")
    path = card.weights.parent / ONNX_NAME
    tmp = path.with_name("tmp-" + ONNX_NAME)
    tmp.write_bytes(data)
    tmp.replace(path)
    return {"file": ONNX_NAME, "sha256": sha256_of(path), "opset": OPSET, "outputs": names,
            "checked": {"inputs": f"{len(x)} fixed windows (export.check_inputs)", "max_abs_diff": diff,
                        "atol": ATOL}}


def export_card(card: ModelCard) -> dict:
    """The served model (no training-only heads) rebuilt from the card's weights file, exported beside
    it; returns the card's ``onnx`` block. What crnnembed loads is what gets exported."""
    import_tensorflow()
    net = build_for(card)
    try:
        net.load_weights(str(card.weights))
    except Exception as exc:
        raise ModelError(f"weights {card.weights} do not fit the architecture in the card: {exc}") from None
    return export_model(net, card)


def export(model_dir=None, log=print) -> ModelCard:
    """Export the model in ``model_dir`` (default: the shipped one) and record it in its card."""
    card = ModelCard.load(model_dir)
    card.verify()
    card.onnx = export_card(card)
    card.save(card.weights.parent / CARD_NAME)
    log(f"wrote {card.weights.parent / ONNX_NAME} (largest difference to Keras {card.onnx['checked']['max_abs_diff']:.1e})")
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="crnn-export", description="Export a beets-crnn model to ONNX (crnn.onnx).")
    p.add_argument("model", nargs="?", default=None, help="model folder or card (default: the shipped model)")
    return command_main("crnn-export", lambda: p.parse_args(argv), lambda args: export(args.model))


if __name__ == "__main__":
    sys.exit(main())
