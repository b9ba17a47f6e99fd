"""Semantic segmentation: the Semantic FPN head on a Twins feature pyramid.

Reference: Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019
(the semantic branch), as the Twins paper uses it for ADE20K (Table 2).
"""

import numbers

import keras
import numpy as np
from keras import ops

from keras_twins.checks import is_whole
from keras_twins.layers.registration import register
from keras_twins.model import ImageModel
from keras_twins.model import is_dataset
from keras_twins.model import loaded_tensorflow
from keras_twins.model import pyramid_outputs

IGNORE_LABEL = 255  # pixels with this label count in neither the loss nor the IoU


@register
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of `inputs[0]` to the height and width of `inputs[1]`.

    Exact sizes, not a factor of 2: a stride-32 map of an 800x600 image is
    18x25 while its stride-16 map is 37x50. Static sizes (any exported
    graph) give TFLite's RESIZE_BILINEAR.
    """

    def call(self, inputs):
        source, target = inputs
        height, width = target.shape[1], target.shape[2]
        if height is None or width is None:
            # keras.ops.image.resize takes Python ints only; a map whose size
            # is known only at run time needs the backend's own resize.
            import tensorflow as tf

            size = tf.shape(target)[1:3]
            return ops.cast(tf.image.resize(source, size, method="bilinear"), source.dtype)
        if (height, width) == tuple(source.shape[1:3]):
            return source  # already that size
        return ops.image.resize(source, (height, width), interpolation="bilinear",
                                data_format="channels_last")

    def compute_output_shape(self, input_shapes):
        source, target = input_shapes
        return (source[0], target[1], target[2], source[3])


@register
class SegmentationModel(ImageModel):
    """The functional Semantic FPN network; a batch it cannot take is refused
    in one line (`keras_twins.model.ImageModel`), not deep inside a convolution,
    and so are masks of another size than their images, not deep inside the loss."""

    def _check_targets(self, x, y):
        if is_dataset(x):
            spec = x.element_spec
            if not (isinstance(spec, tuple) and len(spec) > 1):
                return
            x, y = spec[:2]
        images, masks = getattr(x, "shape", None), getattr(y, "shape", None)
        if images is None or masks is None or len(images) != 4:
            return
        images, masks = tuple(images), tuple(masks)
        # (batch, H, W, 1) takes the sparse loss too, and one-hot masks a categorical one.
        fits = len(masks) == 3 or (len(masks) == 4
                                   and masks[3] in (1, None, self.output_shape[-1]))
        fits = fits and all(m is None or i is None or m == i
                            for m, i in zip(masks[:3], images[:3]))
        if not fits:
            raise ValueError(f"{self._masks_take()} Received: masks.shape={masks} for "
                             f"images.shape={images}")

    def _masks_take(self):
        return (f"`{self.name}` classifies each pixel: its masks are (batch, height, width) "
                "class indices, of the same height and width as the images.")

    def _checked_as_it_runs(self, data):
        """The images, and the masks of images whose size is known only as the
        step runs (a pipeline of images of any size), checked then: a mask of
        another size failed in the loss with the graph's trace. `ImageModel`
        words the failed assertion."""
        data = super()._checked_as_it_runs(data)
        tf = loaded_tensorflow()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if tf is None or not (isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor)
                and x.shape.rank == 4 and y.shape.rank in (3, 4)):
            return data
        if None not in x.shape[1:3] and None not in y.shape[1:3]:
            return data  # `_check_targets` saw them
        fits = tf.reduce_all(tf.shape(y)[1:3] == tf.shape(x)[1:3])
        with tf.control_dependencies([tf.debugging.Assert(fits, [
                f"keras_twins: {self._masks_take()} Received: masks.shape=", tf.shape(y)],
                summarize=4)]):
            y = tf.identity(y)
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)


# Known by its class name alone too, for Keras' legacy .h5 format (as TwinsModel).
keras.saving.get_custom_objects()["SegmentationModel"] = SegmentationModel


def SemanticFPN(backbone, num_classes, fpn_channels=256, head_channels=128,
                dropout=0.1, name="semantic_fpn"):
    """Semantic FPN on a Twins backbone: images to per-pixel logits.

    The FPN turns P2..P5 into `fpn_channels` maps: 1x1 lateral convolutions,
    a top-down path (each coarser map resized to the finer one and added),
    and a 3x3 convolution per level. Each level then goes to stride 4 through
    3x3 conv + BatchNorm + ReLU blocks, one per factor of 2, each followed by
    a 2x bilinear upsampling (to the finer level's exact size, as sizes are
    floored at each stride); the four maps are summed, a 1x1 convolution
    classifies, and the logits are resized to the input size.

    Args:
        backbone: a Twins model, usually with `include_top=False` (any
            `keras_twins` constructor or `keras_twins.Twins`); its
            `pyramid_outputs` are found by layer name.
        num_classes: classes of the per-pixel classifier.
        fpn_channels: channels of the FPN maps (256 in the paper).
        head_channels: channels of the per-level heads (128 in the paper).
        dropout: dropout before the classifier.
        name: the model name.

    Returns:
        A `SegmentationModel` (a functional `keras.Model`) from the
        backbone's input, `(batch, H, W, 3)`, to logits
        `(batch, H, W, num_classes)`. Train it with
        `compile_for_segmentation`, on `(image, mask)` pairs.
    """
    for arg, value in (("num_classes", num_classes), ("fpn_channels", fpn_channels),
                       ("head_channels", head_channels)):
        if not is_whole(value, least=1):
            raise ValueError(f"`{arg}` must be a whole number of at least 1. "
                             f"Received: {arg}={value!r}")
    if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1):
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
    pyramid = pyramid_outputs(backbone)
    levels = sorted(pyramid)  # "P2" (finest) .. "P5"
    features = [pyramid[level] for level in levels]

    laterals = [
        _conv(fpn_channels, 1, name=f"fpn_lateral_{level}")(feature)
        for level, feature in zip(levels, features)
    ]
    for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into fine
        coarser = ResizeLike(name=f"fpn_upsample_{levels[i]}")([laterals[i], laterals[i - 1]])
        laterals[i - 1] = keras.layers.Add(name=f"fpn_merge_{levels[i - 1]}")(
            [laterals[i - 1], coarser])
    outputs = [
        _conv(fpn_channels, 3, padding="same", name=f"fpn_output_{level}")(x)
        for level, x in zip(levels, laterals)
    ]

    scaled = []
    for i, (level, x) in enumerate(zip(levels, outputs)):
        for step in range(max(i, 1)):
            prefix = f"head_{level}_{step}"
            x = _conv(head_channels, 3, padding="same", use_bias=False,
                      name=f"{prefix}_conv")(x)
            x = keras.layers.BatchNormalization(epsilon=1e-5, name=f"{prefix}_bn")(x)
            x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
            if i > 0:  # 2x up, to exactly the next finer level's size
                x = ResizeLike(name=f"{prefix}_upsample")([x, outputs[i - 1 - step]])
        scaled.append(x)
    x = keras.layers.Add(name="head_sum")(scaled)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    x = _conv(num_classes, 1, name="classifier")(x)
    image = backbone.inputs[0]
    logits = ResizeLike(name="logits", dtype="float32")([x, image])
    return SegmentationModel(image, logits, name=name)


def _conv(filters, kernel_size, **kwargs):
    """A Conv2D on channels-last maps, whatever `keras.config.image_data_format()` says."""
    return keras.layers.Conv2D(filters, kernel_size, data_format="channels_last", **kwargs)


def compile_for_segmentation(model, optimizer=None, ignore_label=IGNORE_LABEL):
    """Compiles `model` for `(image, mask)` pairs: masks of class ids, `ignore_label` skipped.

    Loss: per-pixel sparse categorical cross-entropy on the logits. Metric:
    mean IoU over the model's classes.
    """
    num_classes = model.output_shape[-1]
    model.compile(
        optimizer=optimizer or keras.optimizers.AdamW(1e-4, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                        ignore_class=ignore_label),
        metrics=[keras.metrics.MeanIoU(num_classes, name="mean_iou", sparse_y_true=True,
                                       sparse_y_pred=False, ignore_class=ignore_label)],
    )
    return model


def synthetic_shapes(num_images, image_size=(64, 96), seed=0):
    """A small segmentation dataset made on the spot: squares and disks on noise.

    Class 0 is the background, 1 the squares (reddish), 2 the disks
    (bluish), with jittered colours, sizes and positions; a one-pixel ring
    around each disk is `IGNORE_LABEL`, as annotation borders often are. For
    checking a segmentation pipeline offline.

    Returns:
        `(images, masks)`: float32 `(n, H, W, 3)` in [0, 255] and uint8 `(n, H, W)`.
    """
    rng = np.random.default_rng(seed)
    height, width = image_size
    rows, cols = np.mgrid[:height, :width]
    images = rng.uniform(40, 140, (num_images, height, width, 3)).astype(np.float32)
    masks = np.zeros((num_images, height, width), np.uint8)
    for image, mask in zip(images, masks):
        for _ in range(rng.integers(1, 4)):
            side = rng.integers(height // 6, height // 2)
            top, left = rng.integers(0, height - side), rng.integers(0, width - side)
            image[top:top + side, left:left + side] = rng.uniform([170, 20, 20], [255, 90, 90])
            mask[top:top + side, left:left + side] = 1
        for _ in range(rng.integers(1, 3)):
            radius = rng.integers(height // 10, height // 4)
            y, x = rng.integers(radius, height - radius), rng.integers(radius, width - radius)
            distance = np.sqrt((rows - y) ** 2 + (cols - x) ** 2)
            image[distance <= radius] = rng.uniform([20, 20, 170], [90, 90, 255])
            mask[distance <= radius - 1] = 2
            mask[(distance > radius - 1) & (distance <= radius)] = IGNORE_LABEL
    return images, masks
