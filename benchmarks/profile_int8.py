"""Where a full-integer int8 TFLite file loses its time, by op type.

    python benchmarks/profile_int8.py [--variant twins_svt_small] [--rounds 10]

Exports the variant (random weights, 224x224, batch 1) as float32, as
full-integer int8, as int8-mixed, and as full-integer int8 with one group of
op types left in float32 at a time, the way `int8-mixed` leaves all of them.
Each file runs in LiteRT on 2 threads with XNNPACK; the script prints its
best latency over alternating rounds. What a group
costs in int8 is the full-integer time minus the time with that group in
float32. It is the profile behind the int8 bound in README's Performance
section.
"""

import argparse
import os
import tempfile

from bench import _best_times, _litert

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GROUPS = {
    "attention products (BATCH_MATMUL)": ["BATCH_MATMUL"],
    "softmax": ["SOFTMAX"],
    "GELU": ["GELU"],
    "LayerNorm statistics": ["MEAN", "SQUARED_DIFFERENCE", "RSQRT", "NEG"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="twins_svt_small")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    import keras_twins
    from keras_twins import export

    model = keras_twins.CONSTRUCTORS[args.variant](input_shape=(224, 224, 3))
    spec = tf.TensorSpec((1, 224, 224, 3), tf.float32, name="images")
    forward = tf.function(export._forward(model, "probabilities"), input_signature=[spec],
                          autograph=False)
    rng = np.random.default_rng(0)
    calibration = [[rng.uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)]
                   for _ in range(8)]
    image = rng.uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        saved_model = os.path.join(folder, "saved_model")
        export._write_saved_model(model, forward, spec, saved_model)

        def convert(name, quantize, float_ops=export.FLOAT_IN_MIXED_INT8):
            converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
            path = os.path.join(folder, f"{len(runs)}.tflite")
            with open(path, "wb") as f:
                f.write(export._convert_tflite(converter, quantize, lambda: iter(calibration),
                                               float_ops))
            runs[name] = _litert(path, image)

        runs = {}
        convert("float32", "none")
        convert("full-integer int8", "int8")
        convert("int8-mixed (all groups in float32)", "int8-mixed")
        for group, ops in GROUPS.items():
            convert(f"int8, {group} in float32", "int8-mixed", ops)
        best = {name: seconds * 1e3 for name, seconds in _best_times(runs, args.rounds).items()}

    full = best["full-integer int8"]
    print(f"{args.variant}, batch 1, 224x224, LiteRT with XNNPACK on 2 threads, "
          f"best of {args.rounds}")
    print(f"  {'file':70s} {'ms':>7s} {'int8 cost (ms)':>15s}")
    for name, ms in best.items():
        cost = f"{full - ms:.1f}" if name.startswith("int8,") else ""
        print(f"  {name:70s} {ms:7.1f} {cost:>15s}")


if __name__ == "__main__":
    main()
