"""The Twins builder and the six variants of the paper.

Reference: Chu et al., "Twins: Revisiting the Design of Spatial Attention in
Vision Transformers", NeurIPS 2021 (https://arxiv.org/abs/2104.13840).
"""

import contextlib
import numbers
import os
import re
import sys
import types

import keras
import numpy as np

from keras_twins import cpu_streams
from keras_twins import variants
from keras_twins.channels import RGB
from keras_twins.channels import pixel_statistics
from keras_twins.checks import is_whole
from keras_twins.images import FILE_CHANNELS
from keras_twins.layers import initializers
from keras_twins.layers import LayerNorm
from keras_twins.layers import PatchEmbedding
from keras_twins.layers import PositionalEncodingGenerator
from keras_twins.layers import TransformerBlock
from keras_twins.layers.layer_norm import onednn_inference_kernels
from keras_twins.weights import copy_weights
from keras_twins.weights import load_weights
from keras_twins.weights import loading_layout
from weights_convert.mapping import check_stem_channels


def _pixel_scale_and_offset(channels):
    """(x / 255 - mean) / std as one multiply-add: its scale, shaped (1, 1,
    channels), and its offset."""
    mean, std = pixel_statistics(channels)
    return [[[1.0 / (255.0 * s) for s in std]]], [-m / s for m, s in zip(mean, std)]


_WEIGHTS_ERROR = (
    "The `weights` argument should be either `None` (random initialization), "
    "`imagenet` (pre-training on ImageNet), or the path to the weights file to "
    "be loaded (.weights.h5, .safetensors, .pth, .pt or .bin)."
)


def Twins(embed_dims, depths, num_heads, mlp_ratios, sr_ratios,
          window_sizes=None, patch_size=4, include_top=True, weights=None,
          input_tensor=None, input_shape=None, pooling=None, classes=1000,
          classifier_activation="softmax", include_preprocessing=True,
          drop_path_rate=0.0, pyramid_norm=False, name="twins"):
    """Builds a Twins model of any size.

    Each stage embeds patches (stride `patch_size` for the first stage, 2
    after), runs its transformer blocks and adds the positional encoding
    generator after its first block. With `window_sizes`, blocks alternate
    locally-grouped (even index) and global sub-sampled (odd index) attention
    (Twins-SVT); without, every block uses global sub-sampled attention
    (Twins-PCPVT).

    Args:
        embed_dims: channels of each stage.
        depths: transformer blocks of each stage.
        num_heads: attention heads of each stage.
        mlp_ratios: MLP hidden channels per channel, for each stage.
        sr_ratios: key/value sub-sampling factor of GSA, for each stage.
        window_sizes: LSA window side for each stage, or `None` for PCPVT.
        patch_size: patch side of the first stage.
        include_top, weights, input_tensor, input_shape, pooling, classes,
        classifier_activation, include_preprocessing, drop_path_rate,
        pyramid_norm, name: as for `TwinsSVTSmall`.

    Returns:
        A `keras.Model` with a `pyramid_outputs` attribute.
    """
    _validate_architecture(
        dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios,
             sr_ratios=sr_ratios, window_sizes=window_sizes),
        patch_size, drop_path_rate, include_top, classes)
    num_stages = len(embed_dims)
    variant = variants.find_variant(
        embed_dims=embed_dims, depths=depths, num_heads=num_heads,
        mlp_ratios=mlp_ratios, sr_ratios=sr_ratios, window_sizes=window_sizes,
    ) if patch_size == 4 else None
    _validate_arguments(weights, variant, include_top, classes, pooling)
    input_shape = _input_shape(input_shape, input_tensor, include_top, variants.min_image_size(
        patch_size, sr_ratios, depths, window_sizes))

    inputs = keras.Input(shape=input_shape) if input_tensor is None else input_tensor
    x = inputs
    if include_preprocessing:
        # (x / 255 - mean) / std as one multiply-add whose constants live in
        # the graph (Normalization's captured tensors became uninitialized
        # variables in TFLite and extra inputs in ONNX). The scale is shaped
        # (1, 1, C): Rescaling reshapes a flat one to (C, 1, 1) when Keras
        # defaults to channels first.
        scale, offset = _pixel_scale_and_offset(input_shape[-1])
        x = keras.layers.Rescaling(scale=scale, offset=offset, name="preprocessing")(x)

    # Stochastic depth grows linearly over all blocks of the network.
    drop_path_rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    block_index = 0
    for stage in range(num_stages):
        x = PatchEmbedding(
            embed_dims[stage], patch_size if stage == 0 else 2,
            name=f"patch_embed_{stage}",
        )(x)
        for i in range(depths[stage]):
            window_size = 1 if window_sizes is None or i % 2 else window_sizes[stage]
            x = TransformerBlock(
                embed_dims[stage],
                num_heads[stage],
                mlp_ratio=mlp_ratios[stage],
                sr_ratio=sr_ratios[stage],
                window_size=window_size,
                drop_path_rate=drop_path_rates[block_index],
                name=f"stage_{stage}_block_{i}",
            )(x)
            block_index += 1
            if i == 0:
                x = PositionalEncodingGenerator(name=f"pos_encoding_{stage}")(x)
        if pyramid_norm:
            # As the official SVT detection/segmentation backbone: the normed
            # map is both the stage's output and the next stage's input.
            x = LayerNorm(
                epsilon=1e-6, name=f"pyramid_norm_{stage}")(x)
    x = LayerNorm(epsilon=1e-6, name="norm")(x)

    if include_top or pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(data_format="channels_last", name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(data_format="channels_last", name="max_pool")(x)
    if include_top:
        # float32 under mixed precision too: the logits and softmax must not
        # overflow or lose small probabilities.
        x = keras.layers.Dense(
            classes, activation=classifier_activation, kernel_initializer=initializers.linear(),
            dtype="float32", name="head",
        )(x)

    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
        if len(inputs) == 1:
            # A one-element list made Keras warn on every call that the
            # inputs' structure differs from the model's.
            inputs = inputs[0]
    model = TwinsModel(inputs, x, name=name)
    if weights is not None:
        has_norms, channels = loading_layout(weights)
        without_norms = pyramid_norm and not has_norms
        channels = channels or input_shape[-1]
        if without_norms or channels != input_shape[-1]:
            # Weights without pyramid norms, or of other channels: load them
            # into the network they fit (a file of another architecture is
            # named as such here), then copy layer by layer.
            source = Twins(embed_dims, depths, num_heads, mlp_ratios, sr_ratios, window_sizes,
                           patch_size, include_top, weights,
                           input_shape=(*input_shape[:2], channels), pooling=pooling,
                           classes=classes, include_preprocessing=include_preprocessing,
                           pyramid_norm=pyramid_norm and not without_norms,
                           name=name)  # which the errors of weights that do not fit name
            if channels != input_shape[-1]:
                check_stem_channels(channels, input_shape[-1], weights, name)  # RGB's adapt
            copy_weights(source, model)
        else:
            load_weights(model, weights, variant, include_top=include_top, classes=classes)
    model.pyramid_outputs = pyramid_outputs(model)
    return model


# `shuffle`'s index in `fit`'s arguments after `x` and `y`.
_SHUFFLE_POSITION = 6


class ImageModel(keras.Model):
    """A functional model of images that refuses a batch it cannot take in one line.

    `check_images` runs when the model is called, before Keras would wrap an
    error raised in `call` with the whole input printed, and on the data that
    `fit`, `evaluate` and `predict` get, before Keras traces a step: once
    they have seen a few sizes, Keras traces the step for any size, and a
    batch too small then failed deep in the graph as it ran.
    """

    def __call__(self, *args, **kwargs):
        check_images(self, args[0] if args else kwargs.get("inputs"))
        return super().__call__(*args, **kwargs)

    def fit(self, x=None, y=None, *args, **kwargs):
        x = self._check_inputs(x, y)
        if "validation_data" in kwargs:
            kwargs["validation_data"] = self._checked_validation(kwargs["validation_data"])
        shuffle_given = len(args) > _SHUFFLE_POSITION or "shuffle" in kwargs
        if is_dataset(x) and not shuffle_given:
            # A pipeline shuffles itself and Keras ignores `shuffle` for it; since
            # Keras 3.15 its default (True) warned so on every `fit(dataset)`.
            kwargs["shuffle"] = False
        _build_before_tracing(self, x, y)
        with _values_kept(self, training=True), _step_errors_named(self):
            return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        x = self._check_inputs(x, y)
        _build_before_tracing(self, x, y)
        with _values_kept(self), _step_errors_named(self):
            return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        _check_data(self, x)
        with _values_kept(self), _step_errors_named(self):
            return super().predict(x, *args, **kwargs)

    # The one-batch forms: a gray batch for a model of fixed size failed in
    # the graph, and a label outside the classes raised 41 lines.
    def train_on_batch(self, x, y=None, *args, **kwargs):
        x = self._check_inputs(x, y)
        with _step_errors_named(self):
            return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        x = self._check_inputs(x, y)
        with _step_errors_named(self):
            return super().test_on_batch(x, y, *args, **kwargs)

    def predict_on_batch(self, x):
        _check_data(self, x)
        with _step_errors_named(self):
            return super().predict_on_batch(x)

    def _check_inputs(self, x, y):
        """The checks of what `fit`, `evaluate` and the one-batch steps get.
        Returns `x`, a pipeline with its labels checked as they come where
        no op of the step checks them (`_labels_checked`)."""
        _check_data(self, x)
        _check_ranks_known(self, x)
        self._check_targets(x, y)
        return _labels_checked(self, x, y)

    def _checked_validation(self, data):
        """`fit`'s `validation_data` through `_check_inputs`: a tuple (or
        list) of images, targets and maybe sample weights, or batches of them
        (a pipeline, a generator or a `PyDataset`)."""
        if isinstance(data, (tuple, list)) and len(data) in (2, 3):
            return (self._check_inputs(data[0], data[1]), *data[1:])
        return data if data is None else self._check_inputs(data, None)

    def _check_targets(self, x, y):
        """Refuses targets that cannot fit the outputs, in one line, where
        their shapes are known before a step runs; a classifier's labels are
        checked as the step runs (`_step_errors_named`)."""

    # The data is a step's last argument: on JAX, the trainer's state comes first.
    def train_step(self, *args):
        return super().train_step(*args[:-1], self._checked_as_it_runs(args[-1]))

    def test_step(self, *args):
        return super().test_step(*args[:-1], self._checked_as_it_runs(args[-1]))

    def predict_step(self, *args):
        return super().predict_step(*args[:-1], self._checked_as_it_runs(args[-1]))

    def _checked_as_it_runs(self, data):
        """`data` with its images checked as `check_images` does, inside the
        step, where their height, width or channels are known only as it runs (a
        `tf.data` pipeline of images of any size): a batch too small or of other
        channels failed deep in the graph, with its 75-line trace. The images
        pass through the assertions, so no op reads them first.
        `_step_errors_named` words a failed one; XLA compiles them to nothing."""
        tf = loaded_tensorflow()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if tf is None or not isinstance(x, tf.Tensor):
            return data  # arrays, whose shape `check_images` saw, or a backend's own tensors
        if x.shape.rank != 4 or None not in x.shape[1:]:
            return data
        shape = tf.shape(x)
        expected, minimum = self.input_shape[-1], smallest_image_side(self)
        assertions = []
        if x.shape[-1] is None and expected is not None:
            assertions.append(tf.debugging.Assert(shape[-1] == expected, [
                f"keras_twins: {_takes_channels(self, expected)} Received: inputs.shape=", shape],
                summarize=4))
        if None in x.shape[1:3]:
            assertions.append(tf.debugging.Assert(tf.reduce_min(shape[1:3]) >= minimum, [
                f"keras_twins: {_takes_sides(self, minimum)} Received: inputs.shape=", shape],
                summarize=4))
        with tf.control_dependencies(assertions):
            x = tf.identity(x)
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)


@keras.saving.register_keras_serializable(package="keras_twins")
class TwinsModel(ImageModel):
    """The functional Twins network; its Keras loops run batches as CPU streams.

    A plain functional model, except that a batch it cannot take is refused
    in one line (`ImageModel`), that `fit`, `evaluate` and `predict` run
    each batch as slices when `keras_twins.use_cpu_streams()` is on, and
    that `evaluate` and `predict` run the LayerNorms as oneDNN's fused kernel
    on a CPU-only TensorFlow unless compiled with XLA
    (`layers.layer_norm.onednn_inference_kernels`).
    """

    _in_keras_loop = False

    def train_step(self, *args, **kwargs):
        with self._keras_loop():
            return super().train_step(*args, **kwargs)

    def test_step(self, *args, **kwargs):
        with self._keras_loop(), self._inference_kernels():
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args, **kwargs):
        with self._keras_loop(), self._inference_kernels():
            return super().predict_step(*args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        def whole(x):
            return super(TwinsModel, self).call(x, training=training, mask=mask)

        if self._in_keras_loop and cpu_streams.active_streams() > 1:
            return cpu_streams.call_in_streams(whole, inputs)
        return whole(inputs)

    def _inference_kernels(self):
        # XLA cannot compile TensorFlow's oneDNN kernels into a jit_compile step.
        return contextlib.nullcontext() if self.jit_compile else onednn_inference_kernels()

    @contextlib.contextmanager
    def _keras_loop(self):
        # The steps are traced once into a tf.function; the flag is read then.
        self._in_keras_loop = True
        try:
            yield
        finally:
            self._in_keras_loop = False


# Keras' legacy .h5 format names a saved model by its class name alone, not
# the registered "keras_twins>TwinsModel": known by it too, a model saved
# with `model.save("model.h5")` loads after `import keras_twins`.
keras.saving.get_custom_objects()["TwinsModel"] = TwinsModel


def check_images(model, inputs):
    """Raises a one-line `ValueError` for a batch `model` cannot take.

    A grayscale batch broadcast silently against the 3-channel normalization
    and ran; a 4-channel one, or an image smaller than the model's smallest
    (any-size models), failed deep in the graph.
    """
    inputs = _single_input(model, inputs)
    shape = tuple(getattr(inputs, "shape", (None,)))
    if len(shape) != 4 and shape != (None,):
        # One image without its batch axis: Keras' error printed every pixel.
        raise ValueError(f"`{model.name}` takes a batch of images, {_batch_shape(model)}; "
                         f"for one image, add the batch axis (image[None]). "
                         f"Received: inputs.shape={shape}")
    channels, expected = shape[-1], model.input_shape[-1]
    if None not in (channels, expected) and channels != expected:
        raise ValueError(f"{_takes_channels(model, expected)} Received: inputs.shape={shape}")
    minimum = smallest_image_side(model)
    if len(shape) == 4 and any(side is not None and side < minimum for side in shape[1:3]):
        raise ValueError(f"{_takes_sides(model, minimum)} Received: inputs.shape={shape}")


def _single_input(model, inputs):
    """The batch in `inputs`, which Keras takes in a list, tuple or dict of one.

    Raises:
        ValueError: `inputs` is a list or tuple of images not stacked into a
            batch, which Keras took for as many inputs.
    """
    if isinstance(inputs, dict) and len(inputs) == 1:
        return next(iter(inputs.values()))
    if not isinstance(inputs, (list, tuple)):
        return inputs
    if len(inputs) == 1:
        return inputs[0]
    shapes = {tuple(item.shape) for item in inputs if hasattr(item, "shape")}
    if len(shapes) == 1 and len(next(iter(shapes))) == 3:
        raise ValueError(f"`{model.name}` takes a batch of images as one array, "
                         f"{_batch_shape(model)}; stack them (np.stack(images)). Received: a "
                         f"{type(inputs).__name__} of {len(inputs)} arrays of shape "
                         f"{next(iter(shapes))}")
    return inputs


def _batch_shape(model):
    channels = model.input_shape[-1] if isinstance(model.input_shape, tuple) else None
    return f"(batch, height, width, {channels or RGB})"


def _takes_channels(model, expected):
    kind = " (RGB)" if expected == RGB else ""
    plural = "" if expected == 1 else "s"
    return f"`{model.name}` takes images with {expected}{kind} channel{plural} in the last axis."


def _takes_sides(model, minimum):
    return f"`{model.name}` takes images of at least {minimum}x{minimum} pixels."


def loaded_tensorflow():
    """TensorFlow where this process has imported it, else None. Its tensors,
    pipelines and errors exist only once it is: on Keras' JAX and torch
    backends, arrays go through `fit` and `predict` without TensorFlow, whose
    import takes seconds (and which a JAX GPU machine may not have)."""
    return sys.modules.get("tensorflow")


def is_dataset(x):
    """Whether `x` is a `tf.data.Dataset`."""
    tf = loaded_tensorflow()
    return tf is not None and isinstance(x, tf.data.Dataset)


def _check_data(model, x):
    """`check_images` on what `fit`, `evaluate` or `predict` got, where its
    shape is known before a step runs: an array or tensor, or the images of
    a `tf.data.Dataset`."""
    if is_dataset(x):
        spec = x.element_spec
        spec = spec[0] if isinstance(spec, tuple) and spec else spec
        if isinstance(spec, loaded_tensorflow().TensorSpec) and spec.shape.rank is not None:
            check_images(model, spec)
    else:
        check_images(model, x)


def _check_ranks_known(model, x):
    """Refuses, in one line, a pipeline of elements of unknown rank (from
    `from_generator` with `TensorSpec(None)`), which Keras' `fit` and
    `evaluate` cannot take: they failed with "as_list() is not defined on an
    unknown TensorShape" or "Cannot take the length of shape with unknown
    rank"."""
    if not is_dataset(x):
        return
    tf = loaded_tensorflow()
    specs = x.element_spec if isinstance(x.element_spec, tuple) else (x.element_spec,)
    for what, spec in zip(("images", "labels", "sample weights"), specs):
        if isinstance(spec, tf.TensorSpec) and spec.shape.rank is None:
            raise ValueError(
                f"`{model.name}` cannot fit or evaluate a pipeline whose {what} have a shape "
                "of unknown rank: give them one, as from_generator's output_signature="
                "(tf.TensorSpec((None, None, 3)), tf.TensorSpec((), tf.int32)) does, or "
                "map tf.ensure_shape over the pipeline")


_LABEL_OUT_OF_RANGE = re.compile(
    r"Received a label value of (-?\d+) which is outside the valid range of \[0, (\d+)\)")
_TORCH_LABEL_OUT_OF_RANGE = re.compile(r"Target (-?\d+) is out of bounds\.?")
_LABEL_REFUSED_AS_IT_CAME = re.compile(r"\[keras_twins label:\] \[(-?\d+)\]")
_REFUSED_AS_IT_RAN = re.compile(r"\[keras_twins: ([^\]]*)\] \[([\d ]*)\]")


@contextlib.contextmanager
def _step_errors_named(model):
    """A batch refused by `_checked_as_it_runs`, or a class index outside
    the model's classes, as a one-line `ValueError`: TensorFlow finds both
    only as a step runs, and raised them with the graph's trace. Labels are
    found so where `_labels_checked` cannot see them first: TensorFlow's
    pipelines on TensorFlow, and on torch a `DataLoader`, whose bad label
    torch's loss raised as an IndexError with its trace."""
    tf = loaded_tensorflow()
    # Without TensorFlow, no TensorFlow graph ran, and there is nothing to word.
    graph_error = () if tf is None else tf.errors.InvalidArgumentError
    try:
        yield
    except IndexError as error:
        label, check = _TORCH_LABEL_OUT_OF_RANGE.fullmatch(str(error)), _label_check(model)
        if label is None or check is None:
            raise
        raise ValueError(check.message(label.group(1))) from None
    except graph_error as error:
        refused = _REFUSED_AS_IT_RAN.search(error.message)
        if refused is not None:
            message, shape = refused.groups()
            raise ValueError(f"{message}{tuple(int(side) for side in shape.split())}"
                             ) from None
        label = _LABEL_REFUSED_AS_IT_CAME.search(error.message)
        if label is not None:
            raise ValueError(_label_check(model).message(label.group(1))) from None
        label = _LABEL_OUT_OF_RANGE.search(error.message)
        if label is None:
            raise
        label, classes = label.groups()
        raise ValueError(_label_check(model, int(classes)).message(label)) from None


@contextlib.contextmanager
def _values_kept(model, training=False):
    """On JAX, Keras takes the values out of a model's variables while `fit`,
    `evaluate` or `predict` runs, and puts the last step's back when it
    ends; an error or an interrupt in `evaluate` or `predict`, or before
    `fit`'s first step, left them empty, and every later call failed with
    "'NoneType' object is not callable". This puts them back then too.
    For `fit`, the optimizer's variables are made first, as Keras would
    make them in its first step, so that theirs are kept too."""
    if keras.backend.backend() != "jax":
        yield
        return
    optimizer = getattr(model, "optimizer", None) if model.compiled else None
    if training and optimizer is not None and not optimizer.built and model.built:
        optimizer.build(model.trainable_variables)
    variables = [*model.variables, *model.metrics_variables]
    if optimizer is not None:
        variables += optimizer.variables
    before = [(variable, variable._value) for variable in variables]
    try:
        yield
    except BaseException:
        model.jax_state_sync()  # the state of the last step that ran, if any did
        for variable, value in before:
            if variable._value is None and value is not None:
                variable.assign(value)
        model._jax_state = None
        raise


class _LabelCheck:
    """Refuses labels outside `classes` (bar `ignore_class`) in one line.
    Picklable, for a `PyDataset`'s worker processes."""

    def __init__(self, model_name, classes, ignore_class):
        self.model_name, self.classes, self.ignore_class = model_name, classes, ignore_class

    def message(self, label):
        ignored = ("" if self.ignore_class is None
                   else f" (or {self.ignore_class}, which its loss ignores)")
        return (f"`{self.model_name}` has {self.classes} classes, so its labels are class "
                f"indices from 0 to {self.classes - 1}{ignored}. Received: a label of {label}")

    def labels(self, labels):
        """Raises for an array or a backend's tensor of labels."""
        labels = (keras.ops.convert_to_numpy(labels) if keras.ops.is_tensor(labels)
                  else np.asarray(labels))
        label = _first_outside(labels, self.classes, self.ignore_class)
        if label is not None:
            raise ValueError(self.message(label))

    def __call__(self, batch):
        """`batch` of a generator or a `PyDataset`, its labels checked."""
        if isinstance(batch, tuple) and len(batch) > 1 and hasattr(batch[1], "shape"):
            self.labels(batch[1])
        return batch


def _label_check(model, classes=None):
    """The `_LabelCheck` of `model`'s loss where it is a sparse categorical
    cross-entropy over one output, whose labels index the output's last
    axis (or `classes`, as TensorFlow's op counted them); else None."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, dict) and len(loss) == 1:
        loss = next(iter(loss.values()))
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            loss = None
    ignore_class = None
    if getattr(loss, "fn", loss) is keras.losses.sparse_categorical_crossentropy:
        if hasattr(loss, "get_config"):
            ignore_class = loss.get_config().get("ignore_class")
        shape = model.output_shape
        if classes is None and isinstance(shape, tuple) and shape and is_whole(shape[-1], 1):
            classes = shape[-1]
    return None if classes is None else _LabelCheck(model.name, classes, ignore_class)


class _CheckedBatches(keras.utils.PyDataset):
    """A `PyDataset` whose batches' labels are checked as they are read."""

    def __init__(self, batches, check):
        super().__init__(workers=batches.workers, use_multiprocessing=batches.use_multiprocessing,
                         max_queue_size=batches.max_queue_size)
        self.batches, self.check = batches, check

    def __getitem__(self, index):
        return self.check(self.batches[index])

    def __len__(self):
        return len(self.batches)

    @property
    def num_batches(self):
        return self.batches.num_batches

    def on_epoch_begin(self):
        self.batches.on_epoch_begin()

    def on_epoch_end(self):
        self.batches.on_epoch_end()


def _first_outside(labels, classes, ignore_class, chunk=1 << 20):
    """The first of an array's labels that is neither a class index nor
    `ignore_class`, or None; in chunks, so that a large array of masks needs
    no copy of its size."""
    if labels.dtype.kind not in "iuf" or labels.size == 0:
        return None
    if labels.dtype.kind in "iu" and labels.min() >= 0 and labels.max() < classes:
        return None
    labels = labels.reshape(-1)
    for start in range(0, labels.size, chunk):
        found = labels[start:start + chunk]
        found = found[np.isfinite(found)].astype(np.int64)
        outside = (found < 0) | (found >= classes)
        if ignore_class is not None:
            outside &= found != ignore_class
        if outside.any():
            return int(found[outside][0])
    return None


def _labels_checked(model, x, y):
    """Refuses, in one line, a label outside the classes of a sparse
    cross-entropy, where no op of the step would: JAX's gather took it and
    trained on silently, and torch raised an IndexError with its trace.
    Arrays are checked here, on every backend. On JAX and torch, a pipeline
    is returned with an assertion mapped over its batches (which
    `_step_errors_named` words), and a generator or `PyDataset` with each
    batch checked as it is read (on a GPU, torch's loss ends in a device-side
    assert). On TensorFlow the loss's op finds a bad label of those as the
    step runs."""
    check = _label_check(model)
    if check is None:
        return x
    backend = keras.backend.backend()
    if isinstance(x, keras.utils.PyDataset):
        return _CheckedBatches(x, check) if backend != "tensorflow" else x
    if isinstance(x, types.GeneratorType):
        return (check(batch) for batch in x) if backend != "tensorflow" else x
    if not is_dataset(x):
        if hasattr(y, "shape") and hasattr(y, "dtype"):
            check.labels(y)
        return x
    tf = loaded_tensorflow()
    spec = x.element_spec
    if (backend == "tensorflow" or not isinstance(spec, tuple) or len(spec) < 2
            or not isinstance(spec[1], tf.TensorSpec)):
        return x
    classes, ignore_class = check.classes, check.ignore_class

    def checked(images, labels, *rest):
        found = tf.cast(labels, tf.int64)
        outside = (found < 0) | (found >= classes)
        if ignore_class is not None:
            outside &= found != ignore_class
        inside = tf.debugging.Assert(tf.logical_not(tf.reduce_any(outside)), [
            "keras_twins label:", tf.boolean_mask(found, outside)[:1]])
        with tf.control_dependencies([inside]):
            return (images, tf.identity(labels), *rest)

    return x.map(checked)


def _build_before_tracing(model, x, y):
    """Creates the optimizer's and the compiled metrics' variables before
    Keras traces a training or test step, as Keras does itself under a
    distribution strategy. Without one it creates them inside the first
    trace, and TensorFlow then traces the whole step again: SVT-S's first
    `fit` step took 62 s rather than 31 s on a 2-core CPU."""
    if getattr(model, "_distribute_strategy", None) is not None or not model.compiled:
        return
    if is_dataset(x):
        batch = x.element_spec
        if not (isinstance(batch, tuple) and len(batch) > 1):  # no labels
            return
    elif hasattr(x, "shape") and hasattr(y, "shape"):
        batch = (x, y)
    else:  # a generator or a PyDataset: Keras builds the variables as it traces
        return
    model._symbolic_build(data_batch=batch)


def no_weight_decay_variables(model):
    """Biases, norm scales and offsets, and the PEG convolutions (as timm):
    what the recipe's AdamW does not decay."""
    excluded = [v for v in model.trainable_variables if len(v.shape) <= 1]
    for layer in model._flatten_layers():
        if isinstance(layer, PositionalEncodingGenerator):
            excluded += [v for v in layer.trainable_variables if len(v.shape) > 1]
    return excluded


def takes_pixels(model):
    """Whether `model` takes RGB pixels in [0, 255]: False for a Twins network
    built with `include_preprocessing=False`, which takes images normalized
    with ImageNet's mean and std (`normalized`), as timm's models do: its
    input meets a patch embedding first. Any other model, one with a layer
    of its own before the Twins network included, is taken to take pixels."""
    for layer in model.layers:  # in the order the input meets them
        if isinstance(layer, PatchEmbedding):
            return False
        if isinstance(layer, keras.Model):
            return takes_pixels(layer)
        if not isinstance(layer, keras.layers.InputLayer):
            return True  # the model's preprocessing, or any other layer before
    return True


def normalized(pixels):
    """Pixels in [0, 255], channels last (RGB, or any count as
    `keras_twins.channels.pixel_statistics` says), normalized as timm's models
    take them."""
    scale, offset = _pixel_scale_and_offset(pixels.shape[-1] or RGB)
    return keras.ops.add(keras.ops.multiply(pixels, np.asarray(scale, "float32")),
                         np.asarray(offset, "float32"))


def image_input_problem(model, any_channels=False):
    """Why `model` does not take one batch of images that keras_twins reads
    from files, `(batch, H, W, 3 or 1)`, or with `any_channels` of images of
    any number of channels; None if it does."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[-1]):
        return (f"not an image model (its input has shape {shape}, not (batch, height, width, "
                "channels))")
    if shape[-1] in FILE_CHANNELS or any_channels:
        return None
    return (f"a model of {shape[-1]}-channel images (input shape {shape}), and keras_twins' "
            "image pipelines read files as RGB or grayscale (3 or 1 channels): run it on a "
            "pipeline of your own (model.fit, model.predict)")


def classifier_outputs(model):
    """What a classifier's `(batch, classes)` output holds: `"probabilities"`,
    or `"logits"` where its last layer is linear (`classifier_activation=None`).
    `None` for a model that is not a classifier: features, pooled or not, or
    a segmentation map."""
    last = model.layers[-1]
    if len(model.output_shape) != 2 or not (hasattr(last, "activation")
                                            or isinstance(last, keras.layers.Softmax)):
        return None
    return "logits" if getattr(last, "activation", None) is keras.activations.linear else (
        "probabilities")


def smallest_image_side(model):
    """The smallest image height and width `model` takes: every stage's map
    keeps a token after its sub-sampling. Read from the Twins layers, so that
    it holds for a model loaded from a file and for a model built on a Twins
    backbone; `variants.MIN_IMAGE_SIZE` for a model without them."""
    sr_ratios, first_patch = [], None
    for layer in model.layers:
        if isinstance(layer, PatchEmbedding):
            first_patch = first_patch or layer.patch_size
            sr_ratios.append(1)
        elif isinstance(layer, TransformerBlock) and layer.window_size == 1 and sr_ratios:
            # GSA (SVT's LSA blocks have windows and sub-sample nothing).
            sr_ratios[-1] = max(sr_ratios[-1], layer.sr_ratio)
    if first_patch is None:
        return variants.MIN_IMAGE_SIZE
    return variants.min_image_size(first_patch, sr_ratios)


_STAGE_LAYER = re.compile(r"stage_(\d+)_block_\d+|pos_encoding_(\d+)|pyramid_norm_(\d+)")


def pyramid_outputs(model):
    """`{"P2": ..., "P5": ...}`: the stage outputs of a Twins model, found by name.

    The same dict as a built model's `pyramid_outputs`, also for a model
    loaded from a `.keras` file, which does not keep that attribute.
    """
    if not isinstance(model, keras.Model):
        raise ValueError("Expected a Twins model, such as keras_twins.TwinsSVTSmall("
                         f"include_top=False). Received: {model!r:.100}")
    found = {}
    for layer in model.layers:  # in graph order: a stage's last layer comes last
        match = _STAGE_LAYER.fullmatch(layer.name)
        if match:
            stage = int(next(group for group in match.groups() if group is not None))
            found[f"P{stage + 2}"] = layer.output  # stride 2**(stage + 2)
    if not found:
        raise ValueError(f"`{model.name}` has no Twins stages (layers named "
                         "stage_S_block_B); it is not a Twins model")
    return found


def _validate_architecture(per_stage, patch_size, drop_path_rate, include_top, classes):
    """keras.applications-style errors for sizes that would fail deep inside a layer."""
    num_stages = None
    for arg, values in per_stage.items():
        if values is None and arg == "window_sizes":
            continue
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"`{arg}` must be a list with one value per stage. "
                             f"Received: {arg}={values!r}")
        num_stages = len(values) if num_stages is None else num_stages
        if len(values) != num_stages:
            raise ValueError(f"`{arg}` must give one value per stage ({num_stages}, as "
                             f"`embed_dims`). Received: {arg}={values!r}")
        if arg == "mlp_ratios":
            fits = all(isinstance(r, numbers.Real) and not isinstance(r, bool)
                       and int(d * r) >= 1 for d, r in zip(per_stage["embed_dims"], values))
            kind = "positive numbers (at least one hidden channel)"
        else:
            fits = all(is_whole(v, 0 if arg == "depths" else 1) for v in values)
            kind = "whole numbers of at least " + ("0" if arg == "depths" else "1")
        if not fits:
            raise ValueError(f"`{arg}` must be {kind}. Received: {arg}={values!r}")
    for dim, heads in zip(per_stage["embed_dims"], per_stage["num_heads"]):
        if dim % heads:
            raise ValueError("Each of `embed_dims` must be a multiple of its `num_heads`. "
                             f"Received: embed_dims={per_stage['embed_dims']!r}, "
                             f"num_heads={per_stage['num_heads']!r}")
    if not is_whole(patch_size, 1):
        raise ValueError(f"`patch_size` must be a whole number of at least 1. "
                         f"Received: patch_size={patch_size!r}")
    if not (isinstance(drop_path_rate, numbers.Real) and 0 <= drop_path_rate < 1):
        raise ValueError(f"`drop_path_rate` must be in [0, 1). "
                         f"Received: drop_path_rate={drop_path_rate!r}")
    if include_top and not is_whole(classes, 1):
        raise ValueError(f"`classes` must be a whole number of at least 1. "
                         f"Received: classes={classes!r}")


def _validate_arguments(weights, variant, include_top, classes, pooling):
    if weights == "imagenet":
        if variant is None:
            raise ValueError(
                "ImageNet weights exist only for the six Twins variants "
                f"({', '.join(variants.VARIANTS)}); this configuration is none "
                "of them. Received: weights='imagenet'"
            )
        if include_top and classes != 1000:
            raise ValueError(
                'If using `weights="imagenet"` with `include_top=True`, '
                f"`classes` should be 1000. Received classes={classes}"
            )
    elif weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise ValueError(f"{_WEIGHTS_ERROR} Received: weights={weights!r}")
        if os.path.isdir(weights):
            raise ValueError(f"`weights` names a folder, not a weights file. "
                             f"Received: weights={weights!r}")
        if not os.path.isfile(weights):
            raise ValueError(f"No file at the `weights` path. {_WEIGHTS_ERROR} "
                             f"Received: weights={weights!r}")
    if not include_top and pooling not in (None, "avg", "max"):
        raise ValueError(
            "`pooling` must be one of None, 'avg' or 'max'. "
            f"Received: pooling={pooling!r}"
        )


def _input_shape(input_shape, input_tensor, include_top, minimum):
    """Defaults to 224x224 with the classifier and to any size without it,
    as keras.applications does, then checks channels and minimum size."""
    if input_tensor is not None and not keras.backend.is_keras_tensor(input_tensor):
        # keras.Input's refusal printed the whole array over dozens of lines.
        shape = getattr(input_tensor, "shape", None)
        raise ValueError(
            "`input_tensor` must be a Keras tensor: keras.Input(...) or a layer's output. "
            f"Received: input_tensor of type {type(input_tensor).__name__}"
            + (f", shape {tuple(shape)}" if shape is not None else "")
        )
    if input_shape is None and input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        size = variants.DEFAULT_IMAGE_SIZE if include_top else None
        input_shape = (size, size, 3)
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__len__") or len(
            input_shape) != 3:  # an int was a TypeError from tuple(); "64" read as ('6', '4')
        raise ValueError(
            "`input_shape` must be (height, width, channels). "
            f"Received: input_shape={input_shape!r}"
        )
    input_shape = tuple(input_shape)
    if not all(side is None or is_whole(side) for side in input_shape):
        raise ValueError(
            "`input_shape` must hold whole numbers (or None for any size). "
            f"Received: input_shape={input_shape}"
        )
    # Channels last whatever keras.config.image_data_format() says: the
    # export contract, timm's features and every layer here are NHWC.
    layout = " (channels last, as Twins models take them)" if input_shape[0] in (1, RGB) else ""
    if input_shape[-1] is None or input_shape[-1] < 1:
        raise ValueError(
            f"The input's channels (its last axis) must be a whole number of at least 1"
            f"{layout}; Received `input_shape={input_shape}`"
        )
    if any(side is not None and side < minimum for side in input_shape[:2]):
        raise ValueError(
            f"Input size must be at least {minimum}x{minimum}{layout}; "
            f"Received: input_shape={input_shape}"
        )
    return input_shape


# variant name (as in timm) -> its constructor, filled in below.
CONSTRUCTORS = {}


def _variant(public_name, variant_name):
    config = variants.get_variant(variant_name)["config"]

    def constructor(include_top=True, weights=None, input_tensor=None,
                    input_shape=None, pooling=None, classes=1000,
                    classifier_activation="softmax", include_preprocessing=True,
                    drop_path_rate=0.0, pyramid_norm=False, name=variant_name):
        return Twins(
            **config, include_top=include_top, weights=weights,
            input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
            classes=classes, classifier_activation=classifier_activation,
            include_preprocessing=include_preprocessing,
            drop_path_rate=drop_path_rate, pyramid_norm=pyramid_norm, name=name,
        )

    constructor.__name__ = constructor.__qualname__ = public_name
    constructor.__doc__ = _DOCSTRING.format(variant=variant_name)
    CONSTRUCTORS[variant_name] = constructor
    return constructor


_DOCSTRING = """Instantiates the {variant} architecture.

Reference: Chu et al., "Twins: Revisiting the Design of Spatial Attention in
Vision Transformers", NeurIPS 2021 (https://arxiv.org/abs/2104.13840).

The model works at any input size of at least 32x32 pixels. With
`include_preprocessing=True` it takes RGB pixels in [0, 255] and normalizes
them with the ImageNet mean and standard deviation itself.

Args:
    include_top: whether to include the classification head (final norm,
        global average pooling, Dense).
    weights: `None` (random initialization), `"imagenet"` (timm's published
        ImageNet-1k weights, downloaded once from `$HF_ENDPOINT` and cached
        in `$KERAS_HOME/models`), or the path of a Keras `.weights.h5` file
        or of a PyTorch checkpoint of the same variant (timm or official
        Twins; `.safetensors`, `.pth`, `.pt` or `.bin`), converted on the fly.
    input_tensor: optional Keras tensor to use as the image input.
    input_shape: `(height, width, 3)`; `(224, 224, 3)` by default with the
        head, `(None, None, 3)` without. A static shape gives a graph whose
        shapes are all static. Any other number of channels works too: RGB
        weights are then adapted as timm adapts them for `in_chans`
        (`keras_twins.channels`).
    pooling: with `include_top=False`: `None` (the normalized final feature
        map, `(batch, H/32, W/32, channels)`), `"avg"` or `"max"`.
    classes: number of classes of the head.
    classifier_activation: activation of the head, `None` for logits.
    include_preprocessing: whether the model normalizes [0, 255] inputs
        itself (`True`) or expects already-normalized inputs, as timm.
    drop_path_rate: stochastic depth rate, growing linearly over the blocks.
    pyramid_norm: add a LayerNorm (eps 1e-6) after each stage, in the main
        path, as the official Twins-SVT detection and segmentation backbones
        do. These norms are not in the ImageNet weights; they start as
        initialized and are learned in fine-tuning.
    name: the model name.

Returns:
    A `keras.Model`. Its `pyramid_outputs` is a dict `{{"P2": ..., "P5": ...}}`
    of the four stage outputs (channels-last, strides 4, 8, 16 and 32),
    before the final norm, as timm's `forward_intermediates` and the
    reference dense-prediction backbones give them to an FPN:
    `keras.Model(model.inputs, model.pyramid_outputs)` is the feature
    extractor. A model loaded from a `.keras` file does not keep this
    attribute; `keras_twins.pyramid_outputs(model)` finds it again.
"""

TwinsPCPVTSmall = _variant("TwinsPCPVTSmall", "twins_pcpvt_small")
TwinsPCPVTBase = _variant("TwinsPCPVTBase", "twins_pcpvt_base")
TwinsPCPVTLarge = _variant("TwinsPCPVTLarge", "twins_pcpvt_large")
TwinsSVTSmall = _variant("TwinsSVTSmall", "twins_svt_small")
TwinsSVTBase = _variant("TwinsSVTBase", "twins_svt_base")
TwinsSVTLarge = _variant("TwinsSVTLarge", "twins_svt_large")
