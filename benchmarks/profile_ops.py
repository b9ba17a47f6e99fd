"""Where a keras_twins step spends its time, by TensorFlow op type.

    python benchmarks/profile_ops.py [--variant twins_svt_small] [--mode predict|fit]

Runs one batch of 16 at 224x224 on 2 threads (predict: the model's
`predict_step`, as `model.predict` traces it; fit: one `model.fit` step
with AdamW, clipping and drop path) under TensorFlow's profiler, and prints
each op type's total time and share. It is the profile behind the bounds
in benchmarks/NOTES.md.
"""

import argparse
import collections
import glob
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="twins_svt_small")
    parser.add_argument("--mode", choices=["predict", "fit"], default="predict")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    import keras_twins
    from keras_twins import training

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    images = np.random.default_rng(0).uniform(0, 255, (16, 224, 224, 3)).astype(np.float32)
    if args.mode == "predict":
        model = keras_twins.CONSTRUCTORS[args.variant](input_shape=(224, 224, 3))
        forward = tf.function(model.predict_step)
        tensor = tf.constant(images)

        def run():
            forward(tensor).numpy()
    else:
        model = keras_twins.CONSTRUCTORS[args.variant](input_shape=(224, 224, 3),
                                                       drop_path_rate=0.2)
        training.compile_for_training(model, training.make_optimizer(model, 1e-4))
        labels = keras.utils.to_categorical(np.arange(16), 1000)

        def run():
            model.fit(images, labels, batch_size=16, epochs=1, verbose=0)

    run()
    run()
    folder = tempfile.mkdtemp(prefix="keras_twins_profile_")
    try:
        tf.profiler.experimental.start(folder)
        run()
        tf.profiler.experimental.stop()
        path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    totals, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {key: value.name for key, value in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" not in name:  # op events are named "op_name:OpType"
                    continue
                op_type = name.rsplit(":", 1)[1]
                totals[op_type] += event.duration_ps / 1e9
                counts[op_type] += 1
    # Drop the events that enclose the ops: the function call and its executor.
    for op_type in [t for t in totals
                    if t.strip().startswith("__inference") or t in ("Run", "Process")]:
        del totals[op_type]
    total = sum(totals.values())
    print(f"{args.variant}, {args.mode}, batch 16: {total:.0f} ms in ops")
    for op_type, ms in totals.most_common(args.top):
        print(f"  {op_type:40s} {ms:8.1f} ms {ms / total:6.1%}  ({counts[op_type]} calls)")


if __name__ == "__main__":
    main()
