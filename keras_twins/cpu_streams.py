"""Batch streams: `fit`, `evaluate` and `predict` on a CPU, one core per slice of the batch.

By default TensorFlow splits every op across all cores, which costs a
synchronization per op; Twins runs about 1,500 ops per forward pass, many of
them small (norms, softmax, the late stages' matmuls). With streams, each core
runs a slice of the batch from end to end on one thread instead, and the
slices meet only at the loss or the output. Measured on 2 cores at batch 16
(SVT-S and PCPVT-S): `model.predict` 6-13% faster, a `fit` step 11-17%
faster (README, Performance).

    import keras_twins
    keras_twins.use_cpu_streams()           # before TensorFlow runs any op
    model = keras_twins.TwinsSVTSmall()
    model.fit(...)                          # each batch runs as 2 (cores) streams

Only the Keras loops of a Twins model split batches; `model(x)`, export and
the layers are unchanged. A batch smaller than the stream count runs in
fewer streams.
"""

import os

import keras

from keras_twins.checks import require_positive_integers

_streams = 1


def use_cpu_streams(streams=None):
    """Runs each batch of a Twins model's `fit`, `evaluate` and `predict` as `streams` slices.

    Sets TensorFlow to one thread per op and `streams` ops at a time, so it
    must come before TensorFlow runs its first op, and it holds for the whole
    process. It is for processes that compute on the CPU only: with one
    thread per op, a single image (batch 1) runs on one core.

    Args:
        streams: slices per batch, `None` for one per core this process may
            use.

    Returns:
        The number of streams.
    """
    global _streams
    if keras.backend.backend() != "tensorflow":
        raise ValueError("CPU streams need the TensorFlow backend; Keras runs on "
                         f"{keras.backend.backend()!r}")
    if streams is None:
        streams = usable_cores()
    require_positive_integers(streams=streams)
    import tensorflow as tf

    accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")
    if accelerators:
        raise ValueError("CPU streams are for processes that compute on the CPU; this one "
                         f"sees {len(accelerators)} accelerator(s). Hide them "
                         "(CUDA_VISIBLE_DEVICES=) or leave streams off")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(streams)
    except RuntimeError:
        raise RuntimeError("use_cpu_streams() must run before TensorFlow's first op: "
                           "TensorFlow fixes its thread pools then") from None
    _streams = streams
    return streams


def usable_cores():
    """The number of cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def active_streams():
    """The number of streams `use_cpu_streams` set, 1 if it was not called."""
    return _streams


def call_in_streams(call, inputs):
    """`call(inputs)`, computed as one `call` per slice of the batch, concatenated.

    A batch of unknown size (Keras traces `fit` on arrays without one) is
    sliced at run time when it has a row for every stream, and run whole
    otherwise: the network cannot run on an empty slice.
    """
    import tensorflow as tf

    def in_slices(batch, streams):
        sizes = [batch // streams + tf.cast(i < batch % streams, tf.int32)
                 for i in range(streams)]
        outputs = [call(part) for part in tf.split(inputs, tf.stack(sizes), num=streams)]
        return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *outputs)

    batch = inputs.shape[0]
    if batch is not None:
        streams = min(_streams, batch)
        return call(inputs) if streams == 1 else in_slices(batch, streams)
    batch = tf.shape(inputs)[0]
    return tf.cond(batch >= _streams, lambda: in_slices(batch, _streams),
                   lambda: call(inputs))
