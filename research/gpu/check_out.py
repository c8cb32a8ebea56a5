"""Each trained model's outputs on fixed inputs under JAX, saved beside its weights (jax_outputs.npz).

``python research/gpu/compare_tf.py DIR...`` on the CPU machine loads the same weights under
TensorFlow and prints the largest difference: a GPU run must load and match there.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpu  # noqa: E402,F401  (the checkout's package, TensorFlow imports off)
from beetsplug.crnn import model  # noqa: E402
from beetsplug.crnn.features import model_input  # noqa: E402

FIXED = np.random.default_rng(0).normal(-40, 15, size=(4, 96, 1366)).astype(np.float32)


def main(dirs) -> None:
    x = model_input(FIXED)[..., None]
    for d in dirs:
        card = model.ModelCard.load(d)
        net = model.build_for(card)
        net.load_weights(str(card.weights))
        out = net.predict(x, verbose=0)
        np.savez(Path(d) / "jax_outputs.npz", x=x, **{f"o{i}": o for i, o in enumerate(out)})
        print(d, card.model_id, [o.shape for o in out])


if __name__ == "__main__":
    main(sys.argv[1:])
