"""Runs a Twins model's Keras loops with CPU streams on, in a process of its own.

    python streams_worker.py '{"window_sizes": [7, 7, 7, 7], ...}'

`use_cpu_streams` fixes TensorFlow's thread pools, so it cannot run in the
test process. Prints one JSON line: the batch sizes each slice was traced
with, the largest differences from the same computation without slices, and
the errors `use_cpu_streams` gives once TensorFlow has started.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = "-1"


def main(config):
    import numpy as np

    import keras
    import keras_twins
    from keras_twins import cpu_streams

    result = {"streams": keras_twins.use_cpu_streams(2), "slices": []}
    import tensorflow as tf

    slice_and_concat = cpu_streams.call_in_streams

    def recording(call, inputs):
        def recorded(part):
            result["slices"].append(part.shape[0])
            return call(part)

        return slice_and_concat(recorded, inputs)

    cpu_streams.call_in_streams = recording
    model = keras_twins.Twins(**config, input_shape=(64, 64, 3), classes=5,
                              classifier_activation=None)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (7, 64, 64, 3)).astype("float32")
    labels = rng.integers(0, 5, 7)

    # predict on arrays (batch size unknown when traced: sliced at run time),
    # including a last batch of 1 (too small to slice).
    whole = model(images).numpy()  # outside the Keras loops: never sliced
    result["predict_error"] = float(np.abs(model.predict(images, batch_size=3, verbose=0)
                                           - whole).max())
    result["slices_predict"] = result.pop("slices")

    # One SGD step on a batch of known size, against the same step on the
    # whole batch with a GradientTape.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    before = [w.numpy() for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss = loss_fn(labels[:4], model(images[:4], training=True))
    gradients = tape.gradient(loss, model.trainable_weights)
    expected = [w - 0.1 * g.numpy() for w, g in zip(before, gradients)]
    result["slices"] = []
    model.compile(keras.optimizers.SGD(0.1), loss_fn)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4, drop_remainder=True)
    history = model.fit(batches, epochs=1, verbose=0)
    result["fit_loss_error"] = abs(history.history["loss"][0] - float(loss))
    result["fit_weight_error"] = max(float(np.abs(w.numpy() - e).max())
                                     for w, e in zip(model.trainable_weights, expected))
    result["slices_fit"] = result.pop("slices")

    keras_twins.use_cpu_streams(2)  # the same again: nothing to change
    try:
        keras_twins.use_cpu_streams(3)
    except RuntimeError as error:
        result["late_error"] = str(error)
    print(json.dumps(result))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
