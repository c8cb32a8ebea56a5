"""Load GPU-trained weights under TensorFlow on this machine; print the largest difference to the JAX outputs."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from beetsplug.crnn import model  # noqa: E402

for d in sys.argv[1:]:
    card = model.ModelCard.load(d)
    net = model.build_for(card)
    net.load_weights(str(card.weights))
    ref = np.load(Path(d) / "jax_outputs.npz")
    out = net.predict(ref["x"], verbose=0)
    names = ["embedding", "genres", "tags"]
    print(d, card.model_id, ", ".join(f"{n} {float(np.abs(o - ref[f'o{i}']).max()):.1e}"
                                      for i, (n, o) in enumerate(zip(names, out))))
