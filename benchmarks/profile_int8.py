"""Where a full-integer int8 TFLite file loses its time, by op type.

    python benchmarks/profile_int8.py [--variant twins_svt_small] [--rounds 10]

Exports the variant (random weights, norm scales and biases spread as
`bench.spread_like_trained` does; 224x224, batch 1) as float32, as
full-integer int8 and as int8-mixed, the way `keras_twins.export` does; then
as full-integer int8 with the attention products left as BATCH_MATMUL (what
the export avoids), and with one group of ops without an int8 kernel in
XNNPACK left in float32 at a time, the way `int8-mixed` leaves all of them.
Each file runs in LiteRT on 2 threads with XNNPACK, and the float32 and
full-integer files on 1 thread too; the script prints each best latency
over alternating rounds. What a group costs in int8 is the
full-integer time minus the time with that group in float32. It is the
profile behind the int8 bound in README's Performance section and
benchmarks/NOTES.md.
"""

import argparse
import os
import tempfile

from bench import _best_times, _litert, _restart_keeping_freed_memory, spread_like_trained

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GROUPS = {
    "softmax": ["SOFTMAX"],
    "GELU": ["GELU"],
    "LayerNorm's RSQRT": ["RSQRT"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="twins_svt_small")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    _restart_keeping_freed_memory()

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    import keras_twins
    from keras_twins import export
    from keras_twins.layers.attention import products_as_fully_connected

    model = keras_twins.CONSTRUCTORS[args.variant](input_shape=(224, 224, 3))
    spread_like_trained(model)
    spec = tf.TensorSpec((1, 224, 224, 3), tf.float32, name="images")
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        calibration = os.path.join(folder, "calibration")
        os.mkdir(calibration)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(
                os.path.join(calibration, f"{i}.png"))
        for name, quantize in [("float32", "none"), ("full-integer int8", "int8"),
                               ("int8-mixed (all groups in float32)", "int8-mixed")]:
            path = export.export(model, os.path.join(folder, f"{quantize}.tflite"),
                                 quantize=quantize, representative_data=calibration)
            runs[name] = _litert(path, image)
            if quantize != "int8-mixed":  # does the file gain from the second thread?
                runs[f"{name} on 1 thread"] = _litert(path, image, threads=1)

        def samples():
            return iter(export._calibration(calibration, spec)())

        def convert(name, quantize, unrolled, float_ops=()):
            saved_model = os.path.join(folder, f"saved_model_{unrolled}")
            if not os.path.exists(saved_model):
                forward = tf.function(export._forward(model, "probabilities"),
                                      input_signature=[spec], autograph=False)
                with products_as_fully_connected(unrolled):
                    export._write_saved_model(forward, spec, saved_model)
            converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
            path = os.path.join(folder, f"{len(runs)}.tflite")
            with open(path, "wb") as f:
                f.write(export._convert_tflite(converter, quantize, samples, float_ops))
            runs[name] = _litert(path, image)

        convert("full-integer int8, attention products as BATCH_MATMUL", "int8", False)
        for group, ops in GROUPS.items():
            convert(f"int8, {group} in float32", "int8-mixed", True, ops)
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
