"""Training Twins with `model.fit`: the paper's recipe, tf.distribute, resumable runs.

The recipe (Chu et al., 2021, following DeiT): AdamW at 1e-3 x global batch /
1024 with weight decay 0.05 (none on biases, norms and the PEG convolutions),
5 warm-up epochs then cosine decay to zero per step, global gradient-norm
clipping at 5.0, label smoothing 0.1, stochastic depth 0.2 / 0.3 / 0.5 for
small / base / large models, 300 epochs.

A run writes into its output folder:

    run.json            the settings, so that the same command can resume,
                        and the split it validates on (`evaluate`'s "auto")
    labels.txt          the class names, one per line, in label order
    history.csv         one row per epoch: loss, accuracy, top-5, validation
    training.png        loss and accuracy curves, train and validation
    logs/               TensorBoard
    checkpoints/        best.keras (by validation loss) and last.keras
    backup/             BackupAndRestore's state while the run is unfinished
    model.keras         the trained model for inference: raw [0, 255] RGB in,
                        probabilities out, float32, no optimizer state
"""

import csv
import dataclasses
import json
import math
import numbers
import os
import shutil
import tempfile
import warnings
import zipfile

import keras
import numpy as np
import tensorflow as tf

from keras_twins import data as data_lib
from keras_twins import variants
from keras_twins.checks import is_whole
from keras_twins.export import TFLiteClassifier
from keras_twins.export import default_class_names
from keras_twins.export import is_tflite_file
from keras_twins.export import read_labels
from keras_twins.export import run_folder
from keras_twins.export import run_labels
from keras_twins.files import non_utf8_problem
from keras_twins.files import other_entries
from keras_twins.files import replacing
from keras_twins.files import write_text
from keras_twins.model import classifier_outputs
from keras_twins.model import image_input_problem
from keras_twins.model import no_weight_decay_variables
from keras_twins.model import normalized
from keras_twins.model import takes_pixels
from keras_twins.weights import WEIGHTS_SUFFIXES
from keras_twins.weights import transferable

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = {None: None, "none": None, "float16": "mixed_float16",
                   "bfloat16": "mixed_bfloat16"}
DROP_PATH_RATES = {"small": 0.2, "base": 0.3, "large": 0.5}
CUSTOM_DROP_PATH_RATE = 0.1
# Settings that change what a run computes; the same values resume a run.
_RUN_KEYS = ("data", "model", "weights", "image_size", "epochs", "batch_size", "augment",
             "learning_rate", "weight_decay", "warmup_epochs", "drop_path_rate",
             "label_smoothing", "seed", "mixed_precision", "channels", "train_split")
# What a run.json written before a setting existed trained with.
_RUN_DEFAULTS = {"channels": 3, "train_split": "train"}


class TrainingError(ValueError):
    """Bad training input; the message is one line that names the problem."""


class TrainingWarning(UserWarning):
    """Something `train` did that the user should know of (the `keras-twins train`
    command prints these)."""


@dataclasses.dataclass
class TrainingResult:
    model: keras.Model
    history: dict
    output: str
    class_names: list
    skipped_files: list


def peak_learning_rate(global_batch_size, base=1e-3):
    """The recipe's linear scaling: `base` at a global batch of 1024."""
    return base * global_batch_size / 1024


def learning_rate_schedule(peak, steps_per_epoch, epochs, warmup_epochs=5):
    """Linear warm-up from 0 to `peak`, then cosine decay to 0, per step."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, int(round(steps_per_epoch * warmup_epochs)))
    if warmup <= 0:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=total)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total - warmup, warmup_target=peak, warmup_steps=warmup)


@keras.saving.register_keras_serializable(package="keras_twins")
class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW, clipping the global batch's gradient, each update one kernel.

    Keras clips `global_clipnorm` on each replica's share of the gradient,
    before the replicas sum their gradients, so a mirrored run clips other
    gradients than a single device does (measured: 1.6e-3 apart after two
    steps). Here the replicas first sum their gradients to find the global
    norm, and each scales its share by the one factor that clips the sum.

    Keras writes Adam's update as about ten element-wise ops per variable,
    each a pass over the weights; TensorFlow's `ResourceApplyAdam` computes
    the same formula in one pass (an SVT-S `fit` step 11% faster on 2 cores).
    """

    def __init__(self, *args, clip_global_norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip_global_norm = clip_global_norm

    def apply(self, grads, trainable_variables=None):
        if self.clip_global_norm:
            grads = self._clipped(list(grads))
        return super().apply(grads, trainable_variables)

    def _clipped(self, grads):
        present = [g for g in grads if g is not None]
        if keras.backend.backend() == "tensorflow":
            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                present = context.all_reduce(tf.distribute.ReduceOp.SUM, present)
            norm = tf.linalg.global_norm(present)
        else:  # one device (Keras' other backends): no replicas to sum over
            norm = keras.ops.sqrt(sum(keras.ops.sum(keras.ops.square(g)) for g in present))
        factor = self.clip_global_norm / keras.ops.maximum(norm, self.clip_global_norm)
        return [None if g is None else g * keras.ops.cast(factor, g.dtype) for g in grads]

    def _apply_weight_decay(self, variables):
        # Keras' TensorFlow optimizer evaluates the learning rate once for each
        # variable it decays: with the recipe's schedule, a cond and a dozen ops
        # each, 150 of them in an SVT-S step, traced and run. Here it is
        # evaluated once, and each variable decays as Keras decays it.
        if self.weight_decay is None or keras.backend.backend() != "tensorflow":
            return super()._apply_weight_decay(variables)
        decayed = [v.value if isinstance(v, keras.Variable) else v
                   for v in variables if self._use_weight_decay(v)]

        def decay(distribution, decayed):
            learning_rate = self.learning_rate

            def decay_one(variable):
                lr = tf.cast(learning_rate, variable.dtype)
                wd = tf.cast(self.weight_decay, variable.dtype)
                variable.assign_sub(variable * wd * lr)

            for variable in decayed:
                distribution.extended.update(variable, decay_one, group=False)

        if decayed:
            tf.__internal__.distribute.interim.maybe_merge_call(
                decay, self._distribution_strategy, decayed)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # TensorFlow's update (Keras calls this on no other backend): Adam's
        # scalars once per step, not once for each variable.
        if self.amsgrad:  # ResourceApplyAdam has no AMSGrad; Keras' ops have.
            return super()._distributed_tf_update_step(distribution, grads_and_vars,
                                                       learning_rate)
        scalars = {}  # per dtype and replica (each has its own learning-rate tensor)

        def apply_adam(variable, gradient, learning_rate):
            dtype = variable.dtype
            key = (dtype, id(learning_rate))
            if key not in scalars:
                step = tf.cast(self.iterations + 1, dtype)
                beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
                scalars[key] = dict(
                    beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                    lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                    epsilon=tf.cast(self.epsilon, dtype))
            index = self._get_variable_index(variable)
            tf.raw_ops.ResourceApplyAdam(
                var=_handle(variable), m=_handle(self._momentums[index]),
                v=_handle(self._velocities[index]), grad=tf.cast(gradient, dtype),
                **scalars[key])

        for gradient, variable in grads_and_vars:
            distribution.extended.update(variable, apply_adam, args=(gradient, learning_rate),
                                         group=False)

    def get_config(self):
        return {**super().get_config(), "clip_global_norm": self.clip_global_norm}


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (a replica's, under a strategy)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


def make_optimizer(model, learning_rate, weight_decay=0.05, clipnorm=5.0):
    """AdamW with the recipe's weight-decay exclusions and global-norm clipping."""
    optimizer = AdamW(
        learning_rate=learning_rate, weight_decay=weight_decay, beta_1=0.9, beta_2=0.999,
        epsilon=1e-8, clip_global_norm=clipnorm)
    optimizer.exclude_from_weight_decay(var_list=no_weight_decay_variables(model))
    return optimizer


def compile_for_training(model, optimizer, label_smoothing=0.1, jit_compile="auto"):
    """Soft-label cross-entropy (MixUp and CutMix mix one-hot labels), top-1, top-5.

    `jit_compile="auto"` compiles the steps with XLA on JAX, as Keras does
    there (uncompiled, a step of a small Twins took 16x as long), and not on
    TensorFlow, where XLA made a CPU training step slower, nor on torch.
    """
    if jit_compile == "auto" and keras.backend.backend() == "tensorflow":
        jit_compile = False
    classes = model.output_shape[-1]
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                 keras.metrics.TopKCategoricalAccuracy(k=min(5, classes), name="top5")],
        jit_compile=jit_compile,
    )


def default_drop_path_rate(model):
    """0.2 / 0.3 / 0.5 for small / base / large variants, 0.1 for other sizes."""
    if isinstance(model, str):
        for size, rate in DROP_PATH_RATES.items():
            if model.endswith(size):
                return rate
    return CUSTOM_DROP_PATH_RATE


def build_model(model, classes, image_size, weights=None, drop_path_rate=0.0, channels=3):
    """A classifier of `classes` at `image_size` from a variant name or a config dict.

    Weights whose head has another size (ImageNet's 1000 classes for
    fine-tuning) bring everything but the head; RGB weights for a model of
    one channel (`channels=1`) are adapted (`keras_twins.channels`).
    """
    import keras_twins

    if isinstance(model, str):
        _check_variant(model)
        constructor = keras_twins.CONSTRUCTORS[model]
    else:
        def constructor(**kwargs):
            return keras_twins.Twins(**model, **kwargs)

    def build(**kwargs):
        try:
            return constructor(input_shape=(*image_size, channels),
                               drop_path_rate=drop_path_rate, **kwargs)
        except TypeError as error:
            raise TrainingError(f"not a usable model configuration: {error}") from None

    if weights is None:
        return build(classes=classes)
    weights = weights if weights == "imagenet" else os.fspath(weights)
    if weights.endswith(".keras"):
        source = load_keras_model(weights)
        found = source.input_shape[-1]
        if found not in (channels, 3):  # RGB's first convolution is adapted
            raise TrainingError(f"{weights}: a model of {found}-channel images, and only RGB "
                                f"ones are adapted to {channels} channels; train with "
                                f"channels={found}")
    else:
        try:
            return build(classes=classes, weights=weights)  # the same head size
        except ValueError:
            pass
        try:
            source = build(include_top=False, weights=weights)
        except ValueError as error:
            raise TrainingError(" ".join(str(error).split())) from None
    classifier = build(classes=classes)
    _transfer_weights(source, classifier, weights)
    return classifier


def _check_variant(name):
    import keras_twins

    if name in keras_twins.CONSTRUCTORS:
        return
    if name.endswith(WEIGHTS_SUFFIXES):
        raise TrainingError(f"{name}: a weights file; give it as the weights to fine-tune "
                            "from, and the model's variant or CONFIG.json as the model")
    raise TrainingError(f"unknown model {name!r}; choose one of "
                        f"{', '.join(keras_twins.CONSTRUCTORS)}, or a CONFIG.json")


def _training_config(config, drop_path_rate):
    """The Twins arguments `build_model` takes, the drop path rate and the classes.

    `train` sets the input size, the weights and a softmax classifier over
    the data's classes: a configuration may repeat its values, not change
    them (Twins said "got multiple values for keyword argument 'classes'").
    The configuration's drop path rate stands unless `train` is given one.
    """
    config = dict(config)
    for key, argument in (("input_shape", "image_size"), ("input_tensor", "image_size"),
                          ("weights", "weights")):
        if key in config:
            raise TrainingError(f"the model configuration sets {key}, which train sets from "
                                f"its argument {argument}; leave {key} out of it")
    for key, value, why in (
            ("include_top", True, "its loss needs"),
            ("classifier_activation", "softmax", "its loss needs"),
            ("include_preprocessing", True, "its pipelines give [0, 255] pixels, as the "
             "trained model.keras takes them")):
        given = config.pop(key, value)
        if given != value:
            raise TrainingError(f"train builds a classifier with {key}={value!r}, which {why}. "
                                f"Received: {key}={given!r} in the model configuration")
    rate = config.pop("drop_path_rate", None)
    if rate is not None and drop_path_rate is not None and rate != drop_path_rate:
        raise TrainingError(f"drop_path_rate is given twice: {rate!r} in the model "
                            f"configuration and {drop_path_rate!r} to train")
    classes = config.pop("classes", None)
    return config, rate if drop_path_rate is None else drop_path_rate, classes


def _check_recipe(**settings):
    """Finite numbers in range: a negative rate or weight decay would train without a word."""
    ranges = dict(learning_rate=("> 0", lambda v: v > 0), weight_decay=(">= 0", lambda v: v >= 0),
                  warmup_epochs=(">= 0", lambda v: v >= 0),
                  label_smoothing=("in [0, 1)", lambda v: 0 <= v < 1),
                  clipnorm=("> 0", lambda v: v > 0))
    for name, value in settings.items():
        if value is None and name in ("learning_rate", "clipnorm"):
            continue  # the default rate; no clipping
        text, fits = ranges[name]
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value) and fits(value)):
            raise TrainingError(f"{name} must be a number {text}. Received: {name}={value!r}")


def load_keras_model(path, any_channels=False):
    """`keras.models.load_model` without compiling; a bad file, or a model that
    takes no RGB images (with `any_channels`, no images), is one TrainingError line."""
    if os.fspath(path).endswith(".keras") and not zipfile.is_zipfile(path):
        # Keras says "File not found" of a file that is there.
        raise TrainingError(f"{path}: not a loadable Keras model (not a zip archive, as a "
                            ".keras file is: damaged, cut short, or another format)")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises several types for a bad file.
        raise TrainingError(f"{path}: not a loadable Keras model "
                            f"({' '.join(str(error).split())[:200]})") from None
    if problem := image_input_problem(model, any_channels):
        raise TrainingError(f"{path}: {problem}")
    return model


def _transfer_weights(source, target, name):
    """Copies every layer of `source` whose name and weight shapes `target`
    shares. The layers of a model inside `source` count too: a fine-tuning
    script's model is often a Twins under a new head."""
    layers = {inner.name: inner for layer in source.layers if isinstance(layer, keras.Model)
              for inner in layer.layers}
    layers.update({layer.name: layer for layer in source.layers})
    copied = 0
    for layer in target.layers:
        match = layers.get(layer.name)
        if match is None or not layer.weights:
            continue
        values = transferable(match, layer)  # an RGB model's, adapted for grayscale
        if values is not None:
            layer.set_weights(values)
            copied += 1
    if not copied:
        raise TrainingError(f"{name}: none of its layers fit the model")


def make_strategy(name="auto", tpu=None):
    """The tf.distribute strategy named by `--strategy`.

    `auto` picks TPU when `tpu` is given, multi-worker when `TF_CONFIG` lists
    more than one worker, mirrored over several local GPUs, else one device.
    `mirrored` without GPUs mirrors over the logical CPUs. On Keras' other
    backends, whose models tf.distribute does not place, `auto` and
    `one_device` give TensorFlow's default strategy (no distribution), and
    the others are refused.
    """
    if name not in STRATEGIES:
        raise TrainingError(f"strategy must be one of {', '.join(STRATEGIES)}. "
                            f"Received: strategy={name!r}")
    if name == "auto" and (tpu or _tf_config_workers() > 1):
        name = "tpu" if tpu else "multi_worker"
    backend = keras.backend.backend()
    if backend != "tensorflow":
        if name in ("auto", "one_device"):
            return tf.distribute.get_strategy()
        raise TrainingError(f"strategy {name!r} is TensorFlow's tf.distribute, and Keras runs "
                            f"on {backend!r}, whose models it does not distribute: train with "
                            "KERAS_BACKEND=tensorflow")
    if name == "auto":
        # Physical devices: listing logical ones would start the runtime,
        # which must not happen before a multi-worker strategy exists.
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "one_device"
    gpus = [] if name in ("multi_worker", "tpu") else tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        if not _tf_config_workers():
            raise TrainingError("strategy multi_worker needs TF_CONFIG with the cluster's "
                                "workers and this task's index")
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as error:
        raise TrainingError(f"no TPU {tpu or '(default)'} reachable: "
                            f"{' '.join(str(error).split())}") from None
    return tf.distribute.TPUStrategy(resolver)


def _tf_config_workers():
    text = os.environ.get("TF_CONFIG", "{}")
    try:
        cluster = json.loads(text).get("cluster", {})
        return len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    except (ValueError, AttributeError, TypeError):  # not JSON, or not of that form
        raise TrainingError('TF_CONFIG must be a JSON object such as {"cluster": {"worker": '
                            f'[...]}}, "task": {{...}}}}. Received: TF_CONFIG={text[:100]!r}') \
            from None


def _is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._num_workers > 1)


def _is_chief(strategy):
    if not _is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def _allow_multi_worker_fit(model, strategy):
    """Works around Keras 3's `fit` under MultiWorkerMirroredStrategy (keras#20585).

    Keras MEAN-reduces the first input batch across workers to build the
    model symbolically, and reduces scalar metrics along an axis they lack
    (tensorflow#72388). The first batch's shapes are all the build needs, and
    scalars reduce with `axis=None`.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = symbolic_build
    reduce = tf_trainer.reduce_per_replica
    if getattr(reduce, "keras_twins_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
                strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None),
                                         values)
        return reduce(values, strategy, reduction)

    reduce_per_replica.keras_twins_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def train(data, model="twins_svt_small", *, output, image_size=224, epochs=300,
          batch_size=128, weights=None, augment="imagenet", learning_rate=None,
          weight_decay=0.05, warmup_epochs=5, drop_path_rate=None, label_smoothing=0.1,
          clipnorm=5.0, strategy="auto", tpu=None, jit_compile="auto", mixed_precision=None,
          backup_dir=None, backup_freq="epoch", resume=False, seed=0, cache=False,
          deterministic=False, train_split="train", validation_split="auto", data_dir=None,
          manual_dir=None, verbose="auto", callbacks=(), channels=3):
    """Trains a Twins classifier with `model.fit` and writes a run folder.

    Args:
        data: `"tfds:NAME"` or an image folder `ROOT/SPLIT/LABEL/*.jpg|png|webp`;
            `train_split` trains and `validation_split` validates.
        model: a variant name, or a dict of `keras_twins.Twins` arguments.
            `train` sets the input shape, the weights and the classes (from
            the data); the dict may repeat, not change, them. Its
            `drop_path_rate` is used unless one is given here.
        output: the run folder (see the module docstring). A folder holding
            another run is refused unless `resume`.
        image_size: `H` or `(H, W)`.
        epochs: total epochs, counting those of a resumed run.
        batch_size: examples per replica per step; the global batch is
            `batch_size x strategy.num_replicas_in_sync`.
        weights: `None`, `"imagenet"` or a checkpoint path; a head of another
            size is left out (fine-tuning).
        augment: `"imagenet"` (the paper's), `"light"` (crop and flip) or
            `"none"`.
        learning_rate: peak learning rate; default 1e-3 x global batch / 1024.
        weight_decay, warmup_epochs, label_smoothing, clipnorm: the recipe.
        drop_path_rate: default 0.2 / 0.3 / 0.5 for small / base / large,
            0.1 for other sizes.
        strategy: a `tf.distribute.Strategy` or one of `STRATEGIES`.
        tpu: the TPU name or address for `strategy="tpu"`.
        jit_compile: compile the train step with XLA: `True`, `False`, or
            `"auto"`: on JAX only (`compile_for_training`). Not on torch,
            where Keras would hand the step to torch.compile.
        mixed_precision: `None`, `"float16"` (with loss scaling) or
            `"bfloat16"`; the attention softmax and the head stay float32,
            and `model.keras` is saved as float32.
        backup_dir: BackupAndRestore's folder (default `output/backup`).
        backup_freq: `"epoch"` or a number of steps between backups.
        resume: continue the run in `output`: from its backup, or else from
            `checkpoints/last.keras` up to `epochs`.
        seed: seeds initialization, shuffling, augmentation and stochastic
            depth; each epoch draws from it and its number, so a resumed
            epoch draws what it would have uninterrupted.
        cache: keep decoded images in memory after the first epoch.
        deterministic: the same input order and augmentation on every run
            with the same seed, so the same weights on the same machine, a
            run stopped and resumed from an epoch's backup included
            (see `data.training_pipeline`).
        train_split: the split to train on, or a slice of it, as
            tensorflow-datasets writes them: `"train[:90%]"` trains on 90%
            of train and `validation_split="train[90%:]"` validates on the
            rest (a folder's slices are of each class, in a fixed order).
        validation_split: a split name (or slice), `"auto"` (validation, val
            or test, whichever exists) or `None`.
        data_dir, manual_dir: tensorflow-datasets' folders.
        verbose: `fit`'s progress display.
        callbacks: more Keras callbacks.
        channels: 3 to train on RGB images, 1 on their gray; RGB weights
            are adapted to one channel (`keras_twins.channels`).

    Returns:
        A `TrainingResult`.

    Raises:
        TrainingError or keras_twins.data.DataError: bad input, with one line
            that names it.
    """
    image_size = _image_size(image_size, _smallest_image_side(model))
    if not isinstance(data, (str, os.PathLike)):
        raise TrainingError("`data` must be 'tfds:NAME' or the path of an image folder. "
                            f"Received: data={data!r}")
    if not isinstance(output, (str, os.PathLike)):
        raise TrainingError(f"`output` must be a folder path. Received: output={output!r}")
    if not (isinstance(train_split, str) and train_split and
            (validation_split is None or isinstance(validation_split, str) and validation_split)):
        raise TrainingError("train_split must be a split name, and validation_split one, "
                            f"'auto' or None. Received: train_split={train_split!r}, "
                            f"validation_split={validation_split!r}")
    for folder in (output, backup_dir or output):
        if problem := non_utf8_problem(folder):
            raise TrainingError(problem)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TrainingError("`weights` must be None, 'imagenet' or a path. "
                            f"Received: weights={weights!r}")
    if not (is_whole(epochs, least=1) and is_whole(batch_size, least=1)):
        raise TrainingError(f"epochs and batch_size must be whole numbers of at least 1. "
                            f"Received: epochs={epochs!r}, batch_size={batch_size!r}")
    if not (is_whole(seed, least=0) and seed < 2**32):
        # NumPy's "Seed must be between 0 and 2**32 - 1" did not say which seed.
        raise TrainingError(f"seed must be a whole number in [0, 2**32). Received: seed={seed!r}")
    _check_recipe(learning_rate=learning_rate, weight_decay=weight_decay,
                  warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                  clipnorm=clipnorm)
    if jit_compile not in (True, False, "auto"):
        raise TrainingError("jit_compile must be True, False or 'auto'. "
                            f"Received: jit_compile={jit_compile!r}")
    if jit_compile not in ("auto", False) and keras.backend.backend() == "torch":
        raise TrainingError("jit_compile is XLA's, on Keras' TensorFlow or JAX backend, and "
                            "Keras runs on 'torch' (where it would mean torch.compile): leave "
                            "it out, or train with KERAS_BACKEND=tensorflow or jax")
    if mixed_precision not in MIXED_PRECISION:
        raise TrainingError("mixed_precision must be None, 'float16' or 'bfloat16'. "
                            f"Received: mixed_precision={mixed_precision!r}")
    data_lib.Augmentation.named(augment)  # checks the name
    data_lib.check_channels(channels)
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, tpu)
    chief = _is_chief(strategy)
    architecture, config_classes = model, None
    if isinstance(model, str):
        _check_variant(model)  # before the data is read
    if isinstance(model, dict):
        architecture, drop_path_rate, config_classes = _training_config(model, drop_path_rate)
    if drop_path_rate is None:
        drop_path_rate = default_drop_path_rate(model)
    settings = dict(data=os.fspath(data), model=model,
                    weights=None if weights is None else os.fspath(weights),
                    image_size=list(image_size), epochs=epochs, batch_size=batch_size,
                    augment=augment, learning_rate=learning_rate, weight_decay=weight_decay,
                    warmup_epochs=warmup_epochs, drop_path_rate=drop_path_rate,
                    label_smoothing=label_smoothing, seed=seed,
                    mixed_precision=mixed_precision, channels=channels,
                    train_split=train_split)
    training_set = data_lib.load_split(data, train_split, data_dir, manual_dir)
    data_lib.check_every_class_has_images(training_set, train_split)
    if validation_split == "auto":
        validation_split = data_lib.default_validation_split(data, data_dir, manual_dir)
    validation = None
    if validation_split:
        validation = data_lib.load_split(data, validation_split, data_dir, manual_dir)
        data_lib.check_same_classes(training_set, validation, validation_split)
    settings["validation_split"] = validation_split  # what `evaluate`'s "auto" scores
    classes = len(training_set.class_names)
    if classes < 2:
        raise TrainingError(f"{data}: the {train_split} split has {classes} class; "
                            "at least 2 needed")
    if config_classes is not None and config_classes != classes:
        raise TrainingError(f"the model configuration has classes={config_classes!r}, but "
                            f"{data} has {classes} classes ("
                            f"{', '.join(training_set.class_names)[:200]})")

    replicas = strategy.num_replicas_in_sync
    global_batch = batch_size * replicas
    steps_per_epoch = training_set.num_examples // global_batch
    static = _is_multi_worker(strategy) or isinstance(strategy, tf.distribute.TPUStrategy)
    validation_data = None if validation is None else data_lib.evaluation_pipeline(
        validation, image_size, global_batch, cache=cache, drop_remainder=static,
        channels=channels)

    output = os.fspath(output)
    backup_dir = os.fspath(backup_dir or os.path.join(output, "backup"))
    if not chief:
        # Beside the chief's, not inside: each worker deletes its own at the end.
        backup_dir = f"{backup_dir}-worker_{strategy.cluster_resolver.task_id}"
    _check_backup_dir(backup_dir, output)
    start = (_check_output(output, backup_dir, settings, resume, epochs,
                           training_set.class_names) if chief else _Start())
    # Other workers write what the chief writes into a folder thrown away at the end.
    work = output if chief else tempfile.mkdtemp(prefix="keras_twins_worker_")
    # Each epoch's batches are drawn from the seed and the epoch's number: a
    # resumed run gets those an uninterrupted one got.
    first_epoch = start.initial_epoch or _restorable_backup(backup_dir)
    train_data = data_lib.training_pipeline(training_set, image_size, global_batch, augment,
                                            seed=seed, cache=cache, deterministic=deterministic,
                                            channels=channels, first_epoch=first_epoch)

    previous_policy = keras.config.dtype_policy()
    keras.utils.set_random_seed(seed)
    try:
        if MIXED_PRECISION[mixed_precision]:
            keras.config.set_dtype_policy(MIXED_PRECISION[mixed_precision])
        with strategy.scope():
            classifier = build_model(architecture, classes, image_size, weights,
                                     drop_path_rate, channels)
            if start.weights_from:
                try:
                    classifier.load_weights(start.weights_from)
                except Exception as error:  # Keras raises several types for a bad file.
                    reason = " ".join(str(error).split()).split(" Target variable:")[0]
                    raise TrainingError(f"cannot resume from {start.weights_from}: "
                                        f"{reason[:300]}") from None
            peak = learning_rate or peak_learning_rate(global_batch)
            schedule = learning_rate_schedule(peak, steps_per_epoch, epochs, warmup_epochs)
            compile_for_training(classifier, make_optimizer(classifier, schedule,
                                                            weight_decay, clipnorm),
                                 label_smoothing, jit_compile)
        if _is_multi_worker(strategy):
            _allow_multi_worker_fit(classifier, strategy)
        if chief:
            # The data and the model are usable: only now does the output
            # folder become this run's (a bad CONFIG.json or checkpoint left
            # a folder holding run.json).
            _record_run(output, settings, training_set.class_names)
        run_callbacks = [
            keras.callbacks.BackupAndRestore(backup_dir, save_freq=backup_freq,
                                             double_checkpoint=True),
            EpochSeeds(seed),
            keras.callbacks.CSVLogger(os.path.join(work, "history.csv"), append=True),
            keras.callbacks.TensorBoard(os.path.join(work, "logs")),
            Checkpoints(os.path.join(work, "checkpoints"),
                        monitor="val_loss" if validation is not None else "loss",
                        history_csv=os.path.join(work, "history.csv")),
            TrainingCurves(os.path.join(work, "history.csv"),
                           os.path.join(work, "training.png")),
            *callbacks,
        ]
        if verbose == "auto":
            verbose = 1 if chief else 0
        fitted = classifier.fit(train_data, epochs=epochs, initial_epoch=start.initial_epoch,
                                steps_per_epoch=steps_per_epoch,
                                validation_data=validation_data, callbacks=run_callbacks,
                                verbose=verbose, shuffle=False)
    finally:
        keras.config.set_dtype_policy(previous_policy)

    # model.keras is for inference: float32, without the optimizer's state
    # (checkpoints/last.keras keeps that for resuming).
    final = build_model(architecture, classes, image_size, None, drop_path_rate, channels)
    final.set_weights(classifier.get_weights())
    save_model(final, os.path.join(work, "model.keras"))
    if not chief:
        shutil.rmtree(work, ignore_errors=True)
    return TrainingResult(classifier, fitted.history, output, training_set.class_names,
                          training_set.skipped)


def evaluate(data, model_file, split="auto", batch_size=64, data_dir=None,
             manual_dir=None, verbose="auto"):
    """Loss, top-1 and top-5 accuracy of a saved classifier on a split.

    `model_file` is a `.keras` model, or a TFLite file written by
    `keras_twins.export.export` (of any quantization, run by LiteRT: what an
    app would compute). The split is resized and center-cropped to
    the model's input size.
    `"auto"` takes the split that the model's run validated on, where
    `model_file` is a run's and `data` its data (a slice, `"train[90%:]"`,
    say); else the first of validation, val and test, else train. The
    results name the split (`"split"`), its example count (`"examples"`)
    and the files skipped as unreadable (`"skipped"`).
    """
    if not isinstance(model_file, (str, os.PathLike)):
        raise TrainingError(f"`model_file` must be a path. Received: model_file={model_file!r}")
    if not is_whole(batch_size, least=1):
        raise TrainingError("batch_size must be a whole number of at least 1. "
                            f"Received: batch_size={batch_size!r}")
    model_file = os.fspath(model_file)
    tflite = os.path.isfile(model_file) and is_tflite_file(model_file)
    if os.path.isdir(model_file) or os.path.isfile(model_file) and not (
            tflite or model_file.lower().endswith((".keras", ".h5"))):
        # Keras' refusal of an ONNX file ran past 200 characters; a SavedModel
        # folder was "no such model file".
        raise TrainingError(f"{model_file}: not a model evaluate reads; it takes a .keras "
                            "model or a .tflite file (from export)")
    if not os.path.isfile(model_file):
        raise TrainingError(f"{model_file}: no such model file")
    if tflite:
        model = TFLiteClassifier(model_file)
        (height, width), channels = model.image_size, model.channels
        outputs, classes = model.output, model.classes
        # An export names the outputs of a run's model by its labels, and
        # others by default names, which say nothing about the order.
        trained_on = None if model.labels == default_class_names(classes) else model.labels
    else:
        model = load_keras_model(model_file)
        height, width = model.input_shape[1:3]
        if height is None or width is None:
            height = width = variants.DEFAULT_IMAGE_SIZE
        channels = model.input_shape[-1]
        outputs = classifier_outputs(model)
        if outputs is None:
            raise TrainingError(f"{model_file}: not an image classifier (its output has shape "
                                f"{model.output_shape}, not (batch, classes))")
        classes = model.output_shape[-1]
        trained_on = run_labels(model_file, classes)
    if split == "auto":
        split, evaluation = _automatic_split(data, model_file, data_dir, manual_dir)
    else:
        evaluation = data_lib.load_split(data, split, data_dir, manual_dir)
    if classes != len(evaluation.class_names):
        raise TrainingError(f"the model has {classes} classes, the {split} split "
                            f"{len(evaluation.class_names)}")
    if trained_on is not None and trained_on != evaluation.class_names:
        # Same count, other names or order: every label would be scored wrong.
        differ = next(i for i, (a, b) in enumerate(zip(trained_on, evaluation.class_names))
                      if a != b)
        raise TrainingError(
            f"the {split} split's classes are not the ones the model was trained on "
            f"(labels.txt): label {differ} is {evaluation.class_names[differ]!r} in the "
            f"split and {trained_on[differ]!r} in the model")
    loss = keras.losses.CategoricalCrossentropy(from_logits=outputs == "logits")
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"),
               keras.metrics.TopKCategoricalAccuracy(k=min(5, classes), name="top5")]
    batches = data_lib.evaluation_pipeline(evaluation, (height, width), batch_size,
                                           channels=channels)
    verbose = 1 if verbose == "auto" else verbose
    if tflite:
        results = _score(model, batches, loss, metrics, verbose)
    else:
        if not takes_pixels(model):  # a Twins model built with include_preprocessing=False
            batches = batches.map(lambda images, labels: (normalized(images), labels))
        model.compile(loss=loss, metrics=metrics)
        results = model.evaluate(batches, return_dict=True, verbose=verbose)
    results["split"] = split
    results["examples"] = evaluation.num_examples
    results["skipped"] = evaluation.skipped
    return results


def _score(classifier, batches, loss, metrics, verbose):
    """`model.evaluate`'s results for a classifier that is not a Keras model."""
    steps = int(batches.cardinality())
    progress = keras.utils.Progbar(steps if steps >= 0 else None, verbose=verbose,
                                   stateful_metrics=["loss"])
    total, count = 0.0, 0
    for step, (images, labels) in enumerate(batches, 1):
        outputs = classifier(images.numpy())
        total += float(loss(labels, outputs)) * len(outputs)
        count += len(outputs)
        for metric in metrics:
            metric.update_state(labels, outputs)
        progress.update(step, [("loss", total / count)])
    return {"loss": total / count, **{metric.name: float(metric.result()) for metric in metrics}}


def _automatic_split(data, model_file, data_dir, manual_dir):
    """`evaluate`'s "auto": the split name and the loaded split."""
    split = _run_validation_split(model_file, data)
    if split is not None:
        try:
            return split, data_lib.load_split(data, split, data_dir, manual_dir)
        except data_lib.DataError:  # other data of the same name (a relative path)
            pass
    split = data_lib.evaluation_split(data, data_dir, manual_dir)
    return split, data_lib.load_split(data, split, data_dir, manual_dir)


def _run_validation_split(model_file, data):
    """The split that the run of `model_file` validated on, if it trained on
    `data`; else None (not a run's model, no validation, other data)."""
    folder = run_folder(model_file)
    run = _read_run(folder) if folder is not None else None
    if run is None or not isinstance(run.get("validation_split"), str):
        return None
    trained_on, data = run.get("data"), os.fspath(data)
    same = trained_on == data or (
        isinstance(trained_on, str) and not data.startswith(data_lib.TFDS_PREFIX)
        and os.path.realpath(trained_on) == os.path.realpath(data))
    return run["validation_split"] if same else None


def save_model(model, path):
    """`model.save` into a temporary file beside `path`, then renamed onto it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as temporary:
        model.save(temporary)


class Checkpoints(keras.callbacks.Callback):
    """`last.keras` after every epoch and `best.keras` when `monitor` improves.

    Each is written whole and renamed into place, so a crash never leaves a
    broken checkpoint.
    """

    def __init__(self, directory, monitor="val_loss", history_csv=None):
        super().__init__()
        self.directory = directory
        self.monitor = monitor
        self.history_csv = history_csv
        self.best = float("inf")

    def on_train_begin(self, logs=None):
        # A resumed run keeps the best of the epochs before it.
        if self.history_csv and os.path.exists(self.history_csv):
            values = read_history(self.history_csv).get(self.monitor, [])
            self.best = min((v for v in values if v == v), default=float("inf"))

    def on_epoch_end(self, epoch, logs=None):
        last = os.path.join(self.directory, "last.keras")
        save_model(self.model, last)
        value = (logs or {}).get(self.monitor)
        if value is not None and value < self.best:
            self.best = value
            shutil.copyfile(last, os.path.join(self.directory, ".best.keras"))
            os.replace(os.path.join(self.directory, ".best.keras"),
                       os.path.join(self.directory, "best.keras"))


class EpochSeeds(keras.callbacks.Callback):
    """Sets the model's random state (stochastic depth's) at the start of
    each epoch from `seed` and the epoch's number.

    Keras' backups and checkpoints leave that state out: a resumed run drew
    the masks of its first epochs again, not those of an uninterrupted one.
    """

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        states = [generator.state for layer in self.model._flatten_layers()
                  for generator in layer._seed_generators]
        draws = np.random.default_rng([self.seed, epoch]).integers(
            0, 2**31 - 1, size=(len(states), 2))
        for state, draw in zip(states, draws):
            state.assign(draw.astype(state.dtype))


class TrainingCurves(keras.callbacks.Callback):
    """Redraws the loss and accuracy curves from `history.csv` after each epoch."""

    def __init__(self, history_csv, image_path):
        super().__init__()
        self.history_csv = history_csv
        self.image_path = image_path

    def on_epoch_end(self, epoch, logs=None):
        # CSVLogger (earlier in the list) has written this epoch's row.
        from keras_twins.plots import plot_history

        plot_history(read_history(self.history_csv), self.image_path)


def read_history(path):
    """history.csv as a dict of column -> list of floats."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {key: [_number(row.get(key)) for row in rows] for key in (rows[0] if rows else {})}


def _number(text):
    """A history.csv cell; CSVLogger writes NA for a value an epoch lacks."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


@dataclasses.dataclass
class _Start:
    initial_epoch: int = 0
    weights_from: str = None


def _check_output(output, backup, settings, resume, epochs, class_names):
    """Checks that `output` is new, this run's, or resumed (from the backup in
    `backup`, or else from its last checkpoint); writes nothing."""
    last = os.path.join(output, "checkpoints", "last.keras")
    start = _Start()
    if os.path.isdir(output) and os.listdir(output):
        previous = _read_run(output)
        current = json.loads(json.dumps(settings))  # tuples as lists, as run.json holds them
        finished = os.path.exists(os.path.join(output, "model.keras"))
        same = previous is not None and all(
            previous.get(key, _RUN_DEFAULTS.get(key)) == current.get(key) for key in _RUN_KEYS)
        # A folder with only run.json and labels.txt is a run that failed
        # before its first epoch (say, out of memory in its first step): reuse it.
        started = bool(set(os.listdir(output)) - {"run.json", "labels.txt"})
        if started and previous is None:
            raise TrainingError(f"{output} already holds files that are not a training run; "
                                "choose a new output folder")
        if started and not resume and not (same and not finished):
            what = "a finished run" if finished else "a run with other settings"
            raise TrainingError(f"{output} already holds {what}; choose a new output "
                                "folder, or pass --resume to continue it")
        if started and resume:
            # Its weights would not fit: Keras listed every layer, thousands of characters.
            if previous.get("model") != current["model"]:
                raise TrainingError(f"cannot resume {output} with another model: the run "
                                    f"trains {str(previous.get('model'))[:200]}")
            labels = read_labels(os.path.join(output, "labels.txt"))
            if labels is not None and labels != list(class_names):
                raise TrainingError(f"cannot resume {output} on data of other classes: the "
                                    f"run trains {len(labels)} ({', '.join(labels)[:200]}), "
                                    f"the data has {len(class_names)}")
        if resume and not os.path.isdir(backup) and os.path.exists(last):
            history = os.path.join(output, "history.csv")
            try:
                done = len(read_history(history).get("epoch", []))
            except (OSError, ValueError) as error:  # ValueError: not UTF-8
                raise TrainingError(f"cannot resume {output}: its history.csv, which counts "
                                    f"the epochs of checkpoints/last.keras, is unreadable "
                                    f"({' '.join(str(error).split())})") from None
            if done >= epochs:
                raise TrainingError(f"{output} has trained {done} epochs already; "
                                    "pass more --epochs to continue it")
            start = _Start(initial_epoch=done, weights_from=last)
    return start


# What Keras' BackupAndRestore writes into its folder (with double_checkpoint).
_BACKUP_FILES = ("latest.weights.h5", "training_metadata.json")


def _restorable_backup(backup_dir):
    """The epoch that BackupAndRestore resumes at from `backup_dir` (0: none).

    Keras writes a backup in place, its weights and then its metadata, and
    keeps the one before as `.bkp` files. A run killed while it wrote left a
    file cut short, and starting it again failed with a traceback (Keras
    falls back on the backup before only where the weights do not open).
    Where the latest backup does not read, the one before is copied over it.
    Where neither does (a kill while the first was written), the damaged
    files are deleted and the run starts again, with a `TrainingWarning`.
    """
    latest = [os.path.join(backup_dir, name) for name in _BACKUP_FILES]
    if not any(os.path.exists(path) for path in latest):
        return 0
    epoch, problem = _read_backup(*latest)
    if problem is None:
        return epoch
    previous = [f"{path}.bkp" for path in latest]
    epoch, _ = _read_backup(*previous)
    if epoch is not None:
        for source, target in zip(previous, latest):
            shutil.copyfile(source, f"{target}.partial")
            os.replace(f"{target}.partial", target)
        return epoch
    for path in latest + previous:
        if os.path.exists(path):
            os.remove(path)
    warnings.warn(f"the backup in {backup_dir} did not read ({problem}), and there is no "
                  "earlier one: it was deleted, and the run starts again from its first epoch",
                  TrainingWarning, stacklevel=3)
    return 0


def _read_backup(weights, metadata):
    """`(epoch, None)` for a backup that Keras can restore, else `(None, problem)`."""
    import h5py

    if not os.path.exists(weights):
        return None, f"{os.path.basename(weights)} is missing"
    try:
        h5py.File(weights, "r").close()
    except OSError as error:
        return None, f"{os.path.basename(weights)} does not read ({str(error)[:120]})"
    try:
        with open(metadata, encoding="utf-8") as f:
            epoch = json.load(f)["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        epoch = None
    if not is_whole(epoch, 0):
        return None, f"{os.path.basename(metadata)} is not Keras' backup metadata"
    return epoch, None


def _check_backup_dir(backup_dir, output):
    """Refuses a backup folder whose deletion would lose files.

    Keras' BackupAndRestore deletes its whole folder when training ends: a
    `--backup-dir` naming a folder of other files, or one holding the run's
    output, lost them.
    """
    backup = os.path.realpath(backup_dir)
    if os.path.commonpath([backup, os.path.realpath(output)]) == backup:
        raise TrainingError(f"the backup folder {backup_dir} would hold the output "
                            f"{output}, and it is deleted when training ends; choose "
                            "a backup folder outside the output")
    if os.path.lexists(backup_dir) and not os.path.isdir(backup_dir):
        raise TrainingError(f"the backup folder {backup_dir} is a file; choose a new or "
                            "empty folder")
    if os.path.isdir(backup_dir):
        others = other_entries(backup_dir, prefixes=_BACKUP_FILES)
        if others:
            raise TrainingError(f"the backup folder {backup_dir} holds other files "
                                f"({', '.join(others[:3])[:200]}), and it is deleted when "
                                "training ends; choose a new or empty folder")


def _read_run(folder):
    """The settings in `folder`'s run.json, or None where it holds no readable ones."""
    try:
        with open(os.path.join(folder, "run.json"), encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return run if isinstance(run, dict) else None


def _record_run(output, settings, class_names):
    os.makedirs(output, exist_ok=True)
    write_text(os.path.join(output, "run.json"), json.dumps(settings, indent=2) + "\n")
    write_text(os.path.join(output, "labels.txt"), "".join(f"{name}\n" for name in class_names))


def _smallest_image_side(model):
    """The smallest image side `model` (a variant name or Twins arguments) takes."""
    if not isinstance(model, dict):
        return variants.MIN_IMAGE_SIZE
    try:
        return variants.min_image_size(model.get("patch_size", 4), model["sr_ratios"],
                                       model.get("depths"), model.get("window_sizes"))
    except (KeyError, TypeError, ValueError):
        return 1  # not a usable configuration, which `build_model` names


def _image_size(image_size, minimum):
    size = [image_size] if isinstance(image_size, int) else list(image_size)
    if len(size) == 1:
        size *= 2
    if len(size) != 2 or min(size) < minimum:
        raise TrainingError(f"image_size takes H or (H, W), each at least "
                            f"{minimum}. Received: image_size={image_size}")
    return tuple(int(s) for s in size)
