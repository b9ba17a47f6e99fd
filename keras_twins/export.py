"""Export to SavedModel, TFLite (LiteRT) and ONNX.

Every format takes the same input: a float32 batch of RGB images (or of
the model's channels), pixels in [0, 255] (the model normalizes inside), of
a fixed size and batch, so every shape in the exported graph is static. The
output is class probabilities, or logits. `labels.txt` is written beside the exported model.
"""

import contextlib
import json
import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_twins import cpu_streams
from keras_twins.checks import is_whole
from keras_twins.data import IMAGE_SUFFIXES
from keras_twins.files import non_utf8_problem
from keras_twins.files import replacing
from keras_twins.files import write_text
from keras_twins.images import FILE_CHANNELS
from keras_twins.layers.attention import products_as_fully_connected
from keras_twins.model import classifier_outputs
from keras_twins.model import image_input_problem
from keras_twins.model import normalized
from keras_twins.model import smallest_image_side
from keras_twins.model import takes_pixels

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8", "int8-mixed")
# What "int8-mixed" leaves in float32: the ops without an int8 kernel in
# XNNPACK, LiteRT's CPU backend. In a full-integer file each of them splits the
# delegated graph and runs on LiteRT's own kernels. (LayerNorm's MEAN, SUB and
# MUL have XNNPACK int8 kernels: in float32 they made SVT-S 7 ms slower.)
FLOAT_IN_MIXED_INT8 = ("BATCH_MATMUL", "SOFTMAX", "GELU", "RSQRT")
OUTPUTS = ("probabilities", "logits")
ONNX_OPSET = 17  # tf2onnx 1.17 refuses opsets above 18
# Ops that compute sizes at run time; a fixed-shape graph needs none. PACK
# counts only when it packs int32 sizes: the full-integer file packs the
# attention products (`products_as_fully_connected`).
SHAPE_ARITHMETIC = {"SHAPE", "GATHER", "GATHER_ND", "REDUCE_PROD", "PACK"}
INPUT_CONTRACT = {
    "layout": "NHWC", "dtype": "float32", "color": "RGB", "range": [0, 255],
    "normalization": "inside the model (ImageNet mean/std)",
}


def input_color(channels):
    """The input contract's "color" for an input of `channels` channels."""
    return {1: "grayscale", 3: "RGB"}.get(channels, f"{channels} channels")


class ExportError(ValueError):
    """An export that cannot be done; the message is one line for people."""


class SkippedImagesWarning(UserWarning):
    """Unreadable files in the representative-data folder, left out of calibration."""


class LabelsWarning(UserWarning):
    """A training run's labels.txt that does not name its model's outputs."""


def export(model, path, format="tflite", quantize="none", representative_data=None,
           image_size=None, batch_size=1, output="probabilities", labels=None):
    """Exports a Twins model (or any image classifier taking [0, 255] pixels).

    Args:
        model: the Keras model.
        path: where to write: a `.tflite` or `.onnx` file, or a SavedModel
            directory. Written under a temporary name and renamed at the end.
        format: one of `FORMATS`.
        quantize: TFLite only: `"none"`, `"float16"`, `"dynamic"` (int8
            weights, float activations), `"int8"` (full integer, calibrated
            on `representative_data`, for integer-only accelerators) or
            `"int8-mixed"` (calibrated int8 weights and activations for the
            linear layers, convolutions and elementwise ops; the attention
            products, softmax, GELU and LayerNorm statistics in float32: the
            fastest file on phone CPUs, through XNNPACK).
        representative_data: a folder of images for int8 calibration.
        image_size: `(height, width)`; default: the model's static input
            size, or 224x224.
        batch_size: the fixed batch size of the exported graph, or `None`
            for a SavedModel or ONNX file that takes any batch (a dynamic
            batch axis, as Keras' `model.export` and timm's ONNX export
            give, for a server that batches requests).
        output: `"probabilities"` or `"logits"`. A model without a layer
            named `head` (a `SemanticFPN`) is exported with its own output.
        labels: the class names, one per output; default `class_names(model)`
            (ImageNet's names for 1000 classes, else `class_0`, ...). They go
            into `labels.txt` beside the file and the TFLite metadata. A
            `labels.txt` there that names other classes is not replaced.

    Returns:
        The path written.
    """
    if not isinstance(model, keras.Model):
        raise ExportError(f"`model` must be a Keras model. Received: {type(model).__name__}")
    if (backend := keras.backend.backend()) != "tensorflow":
        # The model is traced into a TensorFlow graph, which another backend's
        # layers do not build: it failed deep in the trace.
        raise ExportError(f"export traces the model with TensorFlow, and Keras runs on "
                          f"{backend!r}: export in a process with KERAS_BACKEND=tensorflow "
                          "(a .keras file or weights saved here load there)")
    if problem := image_input_problem(model, any_channels=True):
        raise ExportError(f"`model` is {problem}")
    channels = model.input_shape[-1]
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"`path` must be a file or folder path. Received: path={path!r}")
    path = os.path.normpath(os.fspath(path))
    _check_choice("format", format, FORMATS)
    _check_choice("quantize", quantize, QUANTIZATIONS)
    _check_choice("output", output, OUTPUTS)
    quantized = sorted({layer.quantization_mode for layer in model._flatten_layers()} - {None})
    if quantized and (format == "tflite" or format == "onnx" and "float8" in quantized):
        # Int8 kernels reach the TFLite converter as int8 products it has no
        # kernel for; tf2onnx has no float8 type.
        converter = {"tflite": "TFLite", "onnx": "ONNX"}[format]
        raise ExportError(f"`model` has layers quantized by `model.quantize` "
                          f"({', '.join(quantized)}), which the {converter} converter cannot take: "
                          "export the float model (to TFLite with quantize='dynamic' for int8 "
                          "weights, or 'int8' for a full-integer file). A SavedModel takes it")
    if quantize != "none" and format != "tflite":
        raise ExportError(f"quantization is for TFLite only. Received: format={format!r}, "
                          f"quantize={quantize!r}")
    if quantize.startswith("int8"):
        if channels not in FILE_CHANNELS:
            raise ExportError(f"int8 calibration reads image files as RGB or grayscale, and the "
                              f"model takes {channels}-channel images: export it in float32, "
                              "float16 or with quantize='dynamic'")
        _check_representative_data(representative_data)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ExportError(f"{path}: the output directory does not exist or is not writable")
    _check_replaceable(path, format)
    if format == "saved_model" and (problem := non_utf8_problem(os.path.abspath(path))):
        raise ExportError(problem)
    height, width = export_size(model, image_size)
    if batch_size is None and format == "tflite":
        raise ExportError("a TFLite file takes a fixed batch (LiteRT's resize_tensor_input "
                          "changes it on the device); any batch is for saved_model and onnx. "
                          "Received: batch_size=None")
    if batch_size is not None and not is_whole(batch_size):
        raise ExportError("`batch_size` must be a whole number, or None for any batch. "
                          f"Received: batch_size={batch_size!r}")
    minimum = smallest_image_side(model)
    if min(height, width) < minimum or (batch_size is not None and batch_size < 1):
        raise ExportError(f"the input must be at least {minimum}x{minimum} with a batch of at "
                          f"least 1. Received: image_size={(height, width)}, "
                          f"batch_size={batch_size}")
    fixed = tuple(model.input_shape[1:3])
    if None not in fixed and (height, width) != fixed:
        raise ExportError(f"the model takes {fixed[0]}x{fixed[1]} images; build it with "
                          f"input_shape=(None, None, {channels}) to export another size. "
                          f"Received: image_size={image_size!r}")
    spec = tf.TensorSpec((batch_size, height, width, channels), tf.float32, name="images")
    if format != "saved_model":
        model = _computing_in_float32(model)
    forward = _forward(model, output)
    if not takes_pixels(model):
        # A Twins model built with include_preprocessing=False: every exported
        # file takes [0, 255] pixels, as its metadata and labels.txt say.
        forward = _after_normalizing(forward)
    function = tf.function(forward, input_signature=[spec], autograph=False)

    labels = "\n".join(_checked_labels(model, labels)) + "\n"
    labels_path = os.path.join(directory, "labels.txt")
    _check_labels_file_free(labels_path, labels)
    with replacing(path) as staging:
        if format == "saved_model":
            _write_saved_model(function, spec, staging)
        elif format == "tflite":
            content = _tflite(function, quantize, representative_data, spec)
            contract = dict(INPUT_CONTRACT, shape=list(spec.shape), output=output,
                            color=input_color(channels))
            content = _packaged(content, {
                "labels.txt": labels.encode(),
                "input_contract.json": json.dumps(contract).encode(),
            })
            with open(staging, "wb") as f:
                f.write(content)
        else:
            _write_onnx(function, spec, staging)
    write_text(labels_path, labels)
    return path


def _check_labels_file_free(labels_path, labels):
    """Refuses to replace a `labels.txt` that names other classes.

    It may be a training run's, whose model and commands read it, or an
    earlier export's: either would then name the wrong classes.
    """
    if not os.path.lexists(labels_path):
        return
    existing = read_labels(labels_path)
    if existing == labels.splitlines():
        return
    shown = "not readable UTF-8 text" if existing is None else (
        f"{len(existing)} names: {', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}"
    )[:120]
    raise ExportError(f"{labels_path} names other classes ({shown}); an export writes its "
                      "labels.txt beside the file: export into another folder, or remove it")


def _computing_in_float32(model):
    """`model`, or a float32 copy of it if some layers compute in float16 or bfloat16.

    A model trained with mixed precision (`--mixed-precision`) keeps its
    weights in float32 but computes in half precision: the TFLite converter
    refuses such a graph, and tf2onnx wrote an ONNX file that onnxruntime
    would not load. Their float32 files compute as the float32 model does;
    a SavedModel keeps the model's own precision.
    """
    if all(layer.compute_dtype == "float32" for layer in model._flatten_layers()):
        return model

    def float32(config):
        if isinstance(config, dict):
            config = {key: float32(value) for key, value in config.items()}
            if str(config.get("class_name")).endswith(("DTypePolicy", "DTypePolicyMap")):
                # A policy's name; a quantized one's source (int8_from_mixed_bfloat16);
                # the default of a map of policies (a quantized model's blocks).
                config["config"] = {
                    key: "float32" if key in ("name", "source_name", "default_policy")
                    and str(value).startswith("mixed_") else value
                    for key, value in config["config"].items()}
            return config
        if isinstance(config, list):
            return [float32(value) for value in config]
        return config

    try:
        copy = keras.saving.deserialize_keras_object(
            float32(keras.saving.serialize_keras_object(model)))
        copy.set_weights(model.get_weights())
    except Exception as error:  # e.g. a layer that is not registered for saving
        # Keras' message wraps the cause between its own text and the whole config.
        cause = " ".join(str(error).split()).split("Exception encountered: ")[-1]
        raise ExportError("the model computes in mixed precision and its float32 copy could "
                          f"not be built from its config: {cause.split(' Full object config')[0]}"
                          ) from None
    return copy


def tflite_report(path):
    """What a deployment needs to know about a TFLite file.

    Returns:
        A dict: `ops` (the builtin op names), `flex_or_custom` and
        `shape_arithmetic` (ops that should not be there), `float_ops` (ops
        computing in float in a quantized file), and `gpu_compatibility`
        (the TFLite analyzer's GPU-delegate verdict, one line).
    """
    import io

    from tensorflow.lite.tools import flatbuffer_utils

    content, model = _read_tflite(path)
    graph = model.subgraphs[0]
    ops, float_ops, shape_arithmetic = set(), set(), set()
    for operator in graph.operators:
        code = model.operatorCodes[operator.opcodeIndex]
        name = flatbuffer_utils.opcode_to_name(model, operator.opcodeIndex)
        if code.builtinCode == 32:  # BuiltinOperator.CUSTOM
            name = "CUSTOM:" + (code.customCode or b"").decode()
        ops.add(name)
        output_types = {graph.tensors[i].type for i in operator.outputs}
        if 0 in output_types:  # FLOAT32
            float_ops.add(name)
        if name in SHAPE_ARITHMETIC and (name != "PACK" or 2 in output_types):  # INT32
            shape_arithmetic.add(name)
    analysis = io.StringIO()
    with contextlib.redirect_stdout(analysis):
        tf.lite.experimental.Analyzer.analyze(model_content=content, gpu_compatibility=True)
    verdict = next((line.strip() for line in analysis.getvalue().splitlines()
                    if "GPU delegate" in line), "no GPU-delegate verdict from the analyzer")
    return {
        "ops": sorted(ops),
        "flex_or_custom": sorted(op for op in ops if op.startswith(("FLEX", "CUSTOM"))),
        "shape_arithmetic": sorted(shape_arithmetic),
        "float_ops": sorted(float_ops),
        "gpu_compatibility": verdict,
    }


def _check_choice(name, value, choices):
    if value not in choices:
        raise ExportError(f"`{name}` must be one of {', '.join(choices)}. "
                          f"Received: {name}={value!r}")


def _check_representative_data(folder):
    if folder is None:
        raise ExportError("int8 quantization needs `representative_data`, a folder of "
                          "images. Received: None")
    if not os.path.isdir(folder):
        problem = "not a folder" if os.path.exists(folder) else "no such folder"
        raise ExportError(f"{os.fspath(folder)}: {problem}; int8 quantization's "
                          "`representative_data` is a folder of images")
    if not _image_files(folder):
        raise ExportError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the "
                          "representative-data folder")


def _image_files(folder):
    """The folder's images, its sub-folders (classes) taking turns.

    Round-robin, so that the first files are spread over every class: the
    sorted list put a whole calibration sample in the first few classes of
    a `validation/LABEL/` folder. Hidden folders are skipped, as in training.
    """
    groups = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        files = [os.path.join(root, n) for n in sorted(names)
                 if n.lower().endswith(IMAGE_SUFFIXES)]
        if files:
            groups.append(files)
    longest = max((len(files) for files in groups), default=0)
    return [files[i] for i in range(longest) for files in groups if i < len(files)]


def export_size(model, image_size):
    """`(height, width)` an export will take: `image_size`, else the model's, else 224."""
    fixed = tuple(model.input_shape[1:3])
    if image_size is None:
        return (224, 224) if None in fixed else fixed
    size = [image_size] if np.isscalar(image_size) else list(image_size)
    try:
        if len(size) not in (1, 2) or any(isinstance(s, bool) for s in size):
            raise ValueError
        height, width = [int(s) for s in size * 2][:2]
    except (TypeError, ValueError):
        raise ExportError("`image_size` takes H or (H, W) in pixels. "
                          f"Received: image_size={image_size!r}") from None
    return height, width


def _forward(model, output):
    names = {layer.name for layer in model.layers}
    if output == "probabilities" and classifier_outputs(model) == "logits":
        # A head without softmax (classifier_activation=None).
        return lambda images: keras.ops.softmax(model(images, training=False), axis=-1)
    if output == "probabilities" or "head" not in names:
        # A model without a classification head (SemanticFPN) runs as it is.
        return lambda images: model(images, training=False)
    head = model.get_layer("head")
    features = keras.Model(model.input, head.input)

    def logits(images):
        # The head as it computes, without its softmax: its kernel is int8 and
        # scaled after `model.quantize`, which a product with `head.kernel`
        # ignored, giving logits hundreds of times too large.
        activation, head.activation = head.activation, keras.activations.linear
        try:
            return head(features(images, training=False))
        finally:
            head.activation = activation

    return logits


def _after_normalizing(forward):
    return lambda images: forward(normalized(images))


def _check_replaceable(path, format):
    """Refuses an output path whose replacement would lose something else.

    A file is overwritten only if its name ends as this format's files do
    (`.tflite`, `.onnx`): `model.keras` or `notes.txt` named by mistake must
    not be lost, and a `.onnx` name for a TFLite file is a mistake too. A
    directory is replaced only by a SavedModel, and only if it is an empty
    folder or a SavedModel itself: `--output` naming a folder by mistake must
    not delete that folder.
    """
    suffix = os.path.splitext(path)[1].lower()
    named_for = {f".{other}": other for other in ("tflite", "onnx")}.get(suffix)
    if named_for not in (None, format):
        raise ExportError(f"{path}: a {suffix} name for a {format} export; name it for "
                          f"{format}, or pass format={named_for!r}")
    if os.path.isfile(path) and format != "saved_model" and suffix != f".{format}":
        raise ExportError(f"{path}: exists and is not a .{format} file; choose another path")
    if not os.path.isdir(path):
        if format == "saved_model" and os.path.lexists(path):
            raise ExportError(f"{path}: is a file; a SavedModel is a folder")
        return
    if format != "saved_model":
        raise ExportError(f"{path}: is a folder; a {format} export is one file "
                          f"(for example {os.path.join(path, 'model.' + format)})")
    if os.path.islink(path) or not (
            not os.listdir(path) or os.path.isfile(os.path.join(path, "saved_model.pb"))):
        raise ExportError(f"{path}: exists and is not a SavedModel folder; "
                          "choose a new or empty folder")


def _write_saved_model(function, spec, path):
    """Writes `function`'s one trace as the `serving_default` signature and attribute.

    Not through `keras.export.ExportArchive`: it traced the model three
    times (its walk over the model's objects, looking for lookup tables,
    traced it once more, and so did saving the endpoint as a `tf.function`),
    and an SVT-S took 14-19 s to write instead of 4-5 s. The variables are
    the ones the trace reads, under the names Keras' export gives them.
    """
    serving = function.get_concrete_function(spec)
    root = tf.__internal__.tracking.AutoTrackable()  # as ExportArchive's root
    root.serving_default = serving
    root.variables = list(serving.variables)
    root.trainable_variables = list(serving.trainable_variables)
    root.non_trainable_variables = [v for v in serving.variables if not v.trainable]
    tf.saved_model.save(root, path, signatures={"serving_default": serving})


def _tflite(function, quantize, representative_data, spec):
    # Through a SavedModel, as Keras' own LiteRT export does: converting the
    # concrete function directly left variables unfrozen (READ_VARIABLE ops).
    with tempfile.TemporaryDirectory() as saved_model:
        with products_as_fully_connected(quantize == "int8"):
            _write_saved_model(function, spec, saved_model)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        calibration = None
        if quantize.startswith("int8"):
            calibration = _calibration(representative_data, spec)
        return _convert_tflite(converter, quantize, calibration)


def _convert_tflite(converter, quantize, calibration=None, float_ops=FLOAT_IN_MIXED_INT8):
    """The TFLite file's bytes.

    Args:
        converter: a `tf.lite.TFLiteConverter`.
        quantize: one of `QUANTIZATIONS`.
        calibration: for int8, a function returning an iterable of
            `[image batch]` samples.
        float_ops: the op types that `"int8-mixed"` leaves in float32.
    """
    builtins_only = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.target_spec.supported_ops = builtins_only
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8-mixed":
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = (
            [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] + builtins_only
        )
        # The public way to quantize all but some op types: one calibration,
        # then quantization with those types left in float.
        with warnings.catch_warnings():  # it opens its debug file in tf.lite's old interpreter
            warnings.filterwarnings("ignore", ".*tf.lite.Interpreter is deprecated")
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=calibration,
                debug_options=tf.lite.experimental.QuantizationDebugOptions(
                    denylisted_ops=list(float_ops)),
            )
        return debugger.get_nondebug_quantized_model()
    if quantize == "int8":
        converter.representative_dataset = calibration
        # Integer kernels only; the input and output stay float32 [0, 255].
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            return converter.convert()
        except Exception:  # an op without an int8 kernel: allow float for it
            converter.target_spec.supported_ops = (
                [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] + builtins_only
            )
    return converter.convert()


def _calibration(folder, spec, limit=200):
    """The representative dataset: up to `limit` readable images of `folder`.

    Unreadable files are left out, as training does, with a
    `SkippedImagesWarning` naming them; a folder with none readable is an
    `ExportError`.
    """
    from keras_twins.images import load_image

    batch, height, width, channels = spec.shape
    files, skipped = [], []
    for path in _image_files(folder):
        if len(files) == limit:
            break
        try:
            load_image(path)
            files.append(path)
        except (OSError, ValueError):
            skipped.append(path)
    if not files:
        raise ExportError(f"{folder}: none of its image files could be read")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) in the representative "
                      f"data: {', '.join(skipped[:5])}", SkippedImagesWarning, stacklevel=4)

    def samples():
        # Batches of the graph's fixed size (its reshapes allow no other),
        # the last one filled up from the first files.
        for start in range(0, len(files), batch):
            paths = [files[(start + i) % len(files)] for i in range(batch)]
            yield [np.stack([load_image(path, (height, width), channels=channels)
                             for path in paths]).astype(np.float32)]

    return samples


def _write_onnx(function, spec, path):
    import tf2onnx

    def convert():
        # TensorFlow's Erfc converts through keras_twins.onnx_ops, registered on import.
        return tf2onnx.convert.from_function(function, input_signature=[spec],
                                             opset=ONNX_OPSET)[0]

    try:
        # tf2onnx copies the whole graph before each of its optimizers, 36
        # times, to carry on without one that fails: 17 of SVT-S's 63 s.
        # Without the copies first, and with them only if an optimizer failed.
        with _environment_variable("TF2ONNX_CATCH_ERRORS", "FALSE"):
            try:
                graph = convert()
            except Exception:  # tf2onnx raises many types
                graph = None
        if graph is None:
            graph = convert()
    except Exception as error:
        raise ExportError(f"ONNX conversion failed: {' '.join(str(error).split())}") from None
    # Any batch: named, as timm's export names it, where tf2onnx wrote "unk__800".
    for value in (*graph.graph.input, *graph.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_param"):
            dim.dim_param = "batch"
    _resize_by_sizes(graph)
    with open(path, "wb") as f:
        f.write(graph.SerializeToString())


def _resize_by_sizes(graph):
    """Gives each Resize of a known input size its output size, not scales.

    tf2onnx writes a resize to a fixed size as float32 scales, and ONNX
    computes the output size as floor(input * scale): the stride-4 logits of
    a 97-pixel image (24 rows) scale by 4.0416665, and 24 x 4.0416665 is
    96.99999. onnxruntime's shape inference found 96 rows where the graph
    declares 97 and warned; a runtime that follows it writes 96. The sizes
    (batch and channels from the input's shape, so any batch works) are exact.
    """
    import onnx
    from onnx import helper
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in graph.graph.initializer}
    nodes = list(graph.graph.node)
    resizes = [i for i, node in enumerate(nodes) if node.op_type == "Resize"
               and len(node.input) == 3 and node.input[2] in constants]
    if not resizes:
        return
    inferred = onnx.shape_inference.infer_shapes(graph).graph
    shapes = {value.name: [dim.dim_value or None for dim in value.type.tensor_type.shape.dim]
              for value in (*inferred.value_info, *inferred.input)}
    before = {}  # index of a Resize -> the nodes that compute its sizes
    replaced = set()  # the names of the scales given up
    for i in resizes:
        node = nodes[i]
        shape = shapes.get(node.input[0])
        scales = numpy_helper.to_array(constants[node.input[2]])
        if shape is None or len(shape) != 4 or None in shape[2:] or len(scales) != 4:
            continue
        size = np.array([round(side * scale) for side, scale in zip(shape[2:], scales[2:])],
                        np.int64)
        name = f"resize_by_sizes_{i}"
        graph.graph.initializer.append(numpy_helper.from_array(size, f"{name}_size"))
        before[i] = [
            helper.make_node("Shape", [node.input[0]], [f"{name}_shape"], start=0, end=2),
            helper.make_node("Concat", [f"{name}_shape", f"{name}_size"], [f"{name}_sizes"],
                             axis=0),
        ]
        replaced.add(node.input[2])
        node.input[2] = "resize_empty_scales"
        node.input.append(f"{name}_sizes")
    if not before:
        return
    graph.graph.initializer.append(
        numpy_helper.from_array(np.zeros(0, np.float32), "resize_empty_scales"))
    nodes = [new for i, node in enumerate(nodes) for new in (*before.get(i, ()), node)]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    unused = [tensor for tensor in graph.graph.initializer
              if tensor.name in replaced and tensor.name not in used]
    for tensor in unused:
        graph.graph.initializer.remove(tensor)


@contextlib.contextmanager
def _environment_variable(name, value):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def class_names(model, model_file=None):
    """The names of a classifier's outputs.

    With `model_file` (a `.keras` file written by `keras_twins.train`), the
    `labels.txt` of its run (`run_labels`). Otherwise
    ImageNet's names for 1000 outputs, and `class_0`, `class_1`, ... for
    any other number.
    """
    classes = model.output_shape[-1]
    names = run_labels(model_file, classes) if model_file is not None else None
    return default_class_names(classes) if names is None else names


def default_class_names(classes):
    """The names an export gives outputs that no training run named: ImageNet's
    for 1000 classes, `class_0`, `class_1`, ... for any other number."""
    from keras_twins.imagenet import imagenet_classes

    if classes == 1000:
        return [name for _, name in imagenet_classes()]
    return [f"class_{i}" for i in range(classes)]


def run_labels(model_file, classes):
    """The class names of the training run `model_file` belongs to, or None.

    A run folder (`keras_twins.train`'s output) holds `run.json` and
    `labels.txt`, the model as `model.keras` and its checkpoints in
    `checkpoints/`. The names count only if there is one per output: a
    `labels.txt` outside a run folder (an export's, say) is not a run's.
    A run's `labels.txt` that does not name the outputs (missing, not
    text, another count, an empty line) gets a `LabelsWarning`.
    """
    folder = run_folder(model_file)
    if folder is None:
        return None
    path = os.path.join(folder, "labels.txt")
    names = read_labels(path)
    if names is None:
        problem = "missing or not UTF-8 text"
    elif len(names) != classes:
        problem = f"{len(names)} names for {classes} outputs"
    elif not all(names):
        problem = f"line {names.index('') + 1} is empty"
    else:
        return names
    warnings.warn(f"{path} does not name the model's {classes} classes ({problem}); "
                  "it is not used", LabelsWarning, stacklevel=3)
    return None


def run_folder(model_file):
    """The training run folder that `model_file` belongs to, or None: its
    `model.keras`, or a checkpoint in its `checkpoints/`, beside `run.json`."""
    folder = os.path.dirname(os.path.abspath(model_file))
    if os.path.basename(folder) == "checkpoints":
        folder = os.path.dirname(folder)
    return folder if os.path.isfile(os.path.join(folder, "run.json")) else None


def read_labels(path):
    """The lines of a `labels.txt`, or None if it cannot be read as UTF-8 text
    (with or without the byte-order mark that Windows' Notepad writes)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None


def _checked_labels(model, labels):
    if labels is None:
        return class_names(model)
    classes = model.output_shape[-1]
    if isinstance(labels, str) or len(labels) != classes or not all(
            isinstance(name, str) and name and "\n" not in name for name in labels):
        raise ExportError(f"`labels` must be {classes} class names, one per output, "
                          f"each a non-empty line. Received: {str(labels)[:100]}")
    return list(labels)


def _packaged(content, entries):
    """Adds named metadata buffers (as LiteRT's metadata table holds them).

    And keeps one name per tensor: the converter names each output of a
    multi-output op after all of them, joined by ";" (7.7 kB per name for
    the 128-way unstack of SVT-S's full-integer file, 6.5 of its 31.6 MB).
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.name:
                tensor.name = tensor.name.split(b";")[0]
    for name, data in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8)
        model.buffers.append(buffer)
        metadata = schema.MetadataT()
        metadata.name = name
        metadata.buffer = len(model.buffers) - 1
        model.metadata.append(metadata)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_tflite_metadata(path):
    """The metadata entries of a TFLite file, `{name: bytes}`."""
    _, model = _read_tflite(path)
    return _metadata(model)


def _metadata(model):
    return {m.name.decode(): bytes(model.buffers[m.buffer].data)
            for m in model.metadata or [] if model.buffers[m.buffer].data is not None}


def is_tflite_file(path):
    """Whether `path` names a TFLite file: by its suffix, or by the identifier
    its first bytes hold."""
    if os.fspath(path).lower().endswith(".tflite"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:] == b"TFL3"
    except OSError:
        return False


class TFLiteClassifier:
    """A TFLite classifier written by `export`, run by LiteRT on the CPU.

    Its metadata says what it takes and gives (`input_contract.json`,
    `labels.txt`). Calling it on a float32 batch `(n, height, width,
    channels)` of pixels in [0, 255], of any size `n`, returns its float32
    outputs `(n, classes)`, run at the file's fixed batch.

    Attributes: `image_size` `(height, width)`, `channels`, `classes`,
    `output` (`"probabilities"` or `"logits"`), `labels`, `batch_size`.
    """

    def __init__(self, path, threads=None):
        try:
            content, model = _read_tflite(path)
            entries = _metadata(model)
        except OSError:
            raise
        except Exception:  # the flatbuffer reader fails anywhere in a damaged file
            raise ExportError(f"{path}: not a readable TFLite file (damaged or cut short)"
                              ) from None
        try:
            contract = json.loads(entries["input_contract.json"])
            self.batch_size, height, width, self.channels = contract["shape"]
            self.output = contract["output"]
            if self.output not in OUTPUTS:
                raise ValueError(self.output)
        except (KeyError, ValueError, TypeError):
            raise ExportError(
                f"{path}: a TFLite file without keras_twins' input contract (the metadata "
                "entry input_contract.json that `keras-twins export` writes), so what it "
                "takes is unknown") from None
        self.image_size = (height, width)
        try:
            self.interpreter = _interpreter(content, threads or cpu_streams.usable_cores())
        except (ValueError, RuntimeError) as error:
            raise ExportError(f"{path}: LiteRT cannot run it ({' '.join(str(error).split())})"
                              ) from None
        (source,), (target,) = (self.interpreter.get_input_details(),
                                self.interpreter.get_output_details())
        self.classes = int(target["shape"][-1])
        self._source, self._target = source, target
        source_shape, target_shape = source["shape"].tolist(), target["shape"].tolist()
        if source_shape != contract["shape"]:
            raise ExportError(f"{path}: its input has shape {source_shape}, not the "
                              f"{contract['shape']} its metadata describes")
        if len(target_shape) != 2:  # a segmentation model's, say
            raise ExportError(f"{path}: not an image classifier (its output has shape "
                              f"{target_shape}, not (batch, classes))")
        names = entries.get("labels.txt", b"").decode("utf-8", "replace").splitlines()
        self.labels = names if len(names) == self.classes else None

    def __call__(self, images):
        images = np.asarray(images, np.float32)
        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"the TFLite file takes images of shape (n, {shape}). "
                             f"Received: shape {images.shape}")
        count, batch = len(images), self.batch_size
        if not count:
            return np.zeros((0, self.classes), np.float32)
        padded = np.concatenate([images, np.zeros(
            ((-count) % batch, *images.shape[1:]), np.float32)]) if count % batch else images
        scale, zero_point = self._target["quantization"]
        outputs = []
        for start in range(0, len(padded), batch):
            self.interpreter.set_tensor(self._source["index"], padded[start:start + batch])
            self.interpreter.invoke()
            output = self.interpreter.get_tensor(self._target["index"])
            if scale:  # an integer output
                output = (output.astype(np.float32) - zero_point) * scale
            outputs.append(output.astype(np.float32))
        return np.concatenate(outputs)[:count]


def _interpreter(content, threads):
    """LiteRT's interpreter (ai-edge-litert), else TensorFlow's copy of it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*tf.lite.Interpreter is deprecated")
        interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def _read_tflite(path):
    """The file's bytes and its flatbuffer object, read by Python: TensorFlow's
    readers take UTF-8 paths only."""
    from tensorflow.lite.tools import flatbuffer_utils

    with open(path, "rb") as f:
        content = f.read()
    return content, flatbuffer_utils.read_model_from_bytearray(bytearray(content))
