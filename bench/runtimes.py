"""The CRNN on each inference runtime: CPU seconds per window, load time and peak RSS, one fresh process each.

    nice -n 19 python bench/runtimes.py                    # shipped model, 24 windows per runtime
    nice -n 19 python bench/runtimes.py --windows 48 --runtimes onnx,litert

Runtimes: ``onnx`` (the shipped crnn.onnx on onnxruntime, one thread, one window per call, as
crnnembed runs it in each decoding thread), ``litert`` (ai-edge-litert; the TFLite converter
rejects the Keras 3 GRU's tensor-list ops with a dynamic batch, so the model is exported here
with batch 1 and both GRUs unrolled over their 14 steps, one thread), ``keras-float32`` and
``keras-bfloat16`` (the Keras model through ``Embedder``, batch 4, TensorFlow's own threads).
Each runs in a fresh process (peak RSS is the process's own, imports included); the first
call is not timed. The outputs of each are compared with Keras float32 on the same inputs.
Needs TensorFlow for the LiteRT export and the Keras rows (``pip install beets-crnn[train]``
plus ``ai-edge-litert`` for the LiteRT row). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, mib, print_json, run_timed, table  # noqa: E402

RUNTIMES = ("onnx", "litert", "keras-float32", "keras-bfloat16")


def inputs(n):
    """Model inputs (n, 96, 1366): the fixed windows the ONNX export is checked on, repeated."""
    from beetsplug.crnn.training.export import check_inputs

    x = check_inputs(4)
    return np.concatenate([x] * (n // len(x) + 1))[:n]


def export_litert(model_dir, out: Path) -> Path:
    """The model as a .tflite file: batch 1, both GRUs unrolled (the converter cannot take the dynamic ones)."""
    from beetsplug.crnn.model import ModelCard, build_for, import_tensorflow

    tf = import_tensorflow()
    import keras

    card = ModelCard.load(model_dir)
    net = build_for(card)
    net.load_weights(str(card.weights))

    def unrolled(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.GRU):
            config["unroll"] = True
        return layer.__class__.from_config(config)

    flat = keras.models.clone_model(net, clone_function=unrolled)
    flat.set_weights(net.get_weights())
    saved = out / "saved_model"
    flat.export(str(saved), format="tf_saved_model", verbose=False,
                input_signature=[keras.InputSpec(shape=(1, *net.input.shape[1:]), dtype="float32")])
    path = out / "crnn.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())
    shutil.rmtree(saved)
    return path


def child(runtime, model_dir, tflite, n, out_json):
    """Runs in a fresh process: load the runtime, time ``n`` windows, write outputs for the comparison."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    from beetsplug.crnn.features import model_input
    from beetsplug.crnn.model import Embedder, ModelCard, OnnxEmbedder, l2_normalise

    card = ModelCard.load(model_dir)
    x = inputs(n)
    if runtime == "onnx":
        emb = OnnxEmbedder(card, threads=1)
        run = lambda batch: emb(batch)[0]  # noqa: E731
        step = 1
    elif runtime == "litert":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(tflite), num_threads=1)
        it.allocate_tensors()
        inp = it.get_input_details()[0]["index"]
        dims = {o["shape"][-1]: o["index"] for o in it.get_output_details()}
        width = card.architecture["gru_units"]

        def run(batch):
            it.set_tensor(inp, model_input(batch)[..., None])
            it.invoke()
            return l2_normalise(it.get_tensor(dims[width]))

        step = 1
    else:
        emb = Embedder(card, batch_size=4, precision=runtime.split("-")[1])
        run = lambda batch: emb(batch)[0]  # noqa: E731
        step = 4
    first = run(x[:step])
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
    outs, c, t = [first], time.process_time(), time.perf_counter()
    for i in range(step, n, step):
        outs.append(run(x[i : i + step]))
    timed = n - step
    Path(out_json).write_text(json.dumps({
        "cpu_per_window": (time.process_time() - c) / timed, "wall_per_window": (time.perf_counter() - t) / timed,
        "load_s": load_s, "load_cpu_s": load_cpu, "embeddings": np.concatenate(outs)[:n].tolist()}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the shipped one)")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tflite", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from beetsplug.crnn.model import default_weights_dir

    model_dir = Path(args.model) if args.model else default_weights_dir()
    if args.child:
        return child(args.child, model_dir, args.tflite, args.windows, args.out)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    record = {"bench": "runtimes", "machine": machine(), "model": str(model_dir), "windows": args.windows, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="crnn-bench-runtimes-") as tmp:
        tflite = None
        if "litert" in runtimes:
            tflite = export_litert(model_dir, Path(tmp))
            record["litert_file_bytes"] = tflite.stat().st_size
        results = {}
        for rt in runtimes:
            out = Path(tmp) / f"{rt}.json"
            r = run_timed([sys.executable, __file__, "--child", rt, "--windows", args.windows, "--out", out,
                           "--tflite", tflite or "", *(["--model", args.model] if args.model else [])]).check()
            results[rt] = json.loads(out.read_text())
            results[rt]["rss_mib"] = mib(r.rss)
            print(f"{rt}: {results[rt]['cpu_per_window']:.3f} CPU s/window", file=sys.stderr)
    ref = np.array(results["keras-float32"]["embeddings"]) if "keras-float32" in results else None
    rows = []
    for rt, res in results.items():
        emb = np.array(res.pop("embeddings"))
        res["min_cosine_to_keras_float32"] = float(np.min(np.sum(emb * ref, axis=1))) if ref is not None else None
        record["runs"][rt] = res
        rows.append([rt, res["cpu_per_window"], res["wall_per_window"], res["load_s"], res["rss_mib"],
                     "" if ref is None else f"{res['min_cosine_to_keras_float32']:.6f}"])
    print(f"CRNN alone, {args.windows} windows per runtime, load {record['machine']['loadavg_1m']:.1f}, "
          f"{record['machine']['cores']} cores")
    print(table(rows, ["runtime", "CPU s / window", "wall s / window", "load s", "peak RSS MiB",
                       "min cosine to Keras f32"]))
    print_json(record)


if __name__ == "__main__":
    main()
