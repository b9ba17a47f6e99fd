"""keras_twins against the PyTorch reference, side by side on this machine.

    python benchmarks/bench.py [--variants twins_svt_small twins_pcpvt_small twins_svt_base]
                               [--rounds 5] [--output BENCHMARKS.md]
                               [--threading streams|per-op]

For each variant, in one process, with every contender on the same number of
threads (2 by default), alternating the contenders round by round and
reporting the best of the rounds:

- inference at batch 16: `model.predict` over 3 batches against timm in
  eager mode on the same 3;
- batch-1 latency: the TFLite float32 file in LiteRT (XNNPACK) against
  onnxruntime running timm's ONNX export, and the int8-mixed and full-integer
  int8 files against the float32 one;
- training at batch 16: `model.fit` for 3 steps on a tf.data pipeline (AdamW,
  clipping 5.0, drop path 0.2) against 3 of timm's steps (AdamW,
  clip_grad_norm_, drop path 0.2);
- peak resident memory of a process that runs inference at batch 16, each
  framework in its own process, the median of 3 alternating processes;
- the achieved GFLOP/s as a fraction of this machine's float32 matrix
  multiply rate.

keras_twins runs with `keras_twins.use_cpu_streams(2)` (each batch as two
slices, one per thread), its documented setting for CPU throughput;
`--threading per-op` runs it with TensorFlow splitting each op instead.

The timed runs keep freed memory in the process (`KEEP_FREED_MEMORY`), so
neither framework pays page faults that depend on the process's history.

Writes BENCHMARKS.md. Benchmarks are not tests: nothing here asserts a time.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

THREADS = 2
BATCH = 16
BATCHES = 3  # batches per timed predict / fit call
SIZE = 224
PAUSE = 0.5  # seconds of idle machine before each timed call
# Processes per framework for peak memory, alternating; the median is reported.
# timm's peak moved by 200 MB between identical processes (SVT-B: 1295 to
# 1512 MB), keras_twins' by up to 35.
MEMORY_RUNS = 3
# glibc malloc, told to keep what is freed. By default it hands large blocks
# back to the system after each call and faults them in again on the next: a
# timm batch took 1.4x longer in a fresh process than in one whose heap had
# grown. Timed runs set these so that the reference runs at its best; the
# memory runs keep the defaults.
KEEP_FREED_MEMORY = {
    "MALLOC_TOP_PAD_": str(512 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["twins_svt_small", "twins_pcpvt_small",
                                                              "twins_svt_base"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--threading", choices=["streams", "per-op"], default="streams",
                        help="keras_twins' threads: one per batch slice "
                             "(use_cpu_streams), or TensorFlow splitting each op")
    parser.add_argument("--memory", choices=["keras", "timm"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(_peak_memory(args.memory, args.variant, args.threading)))
        return
    _restart_keeping_freed_memory()
    _limit_threads()
    # torch and timm before TensorFlow: the other order crashes the process.
    import timm  # noqa: F401
    import torch  # noqa: F401
    import tensorflow as tf  # noqa: F401

    _configure_frameworks(args.threading)
    matmul = _matmul_gflops()
    results = {}
    for variant in args.variants:
        print(f"\n{variant}", flush=True)
        results[variant] = _bench_variant(variant, args.rounds)
        peaks = {"keras": [], "timm": []}
        for _ in range(MEMORY_RUNS):
            for process in peaks:
                peaks[process].append(_memory_in_subprocess(process, variant, args.threading))
        for process, values in peaks.items():
            results[variant][f"memory_{process}"] = sorted(values)[len(values) // 2]
            results[variant][f"memory_{process}_runs"] = values
        print(json.dumps(results[variant], indent=2), flush=True)
    _write_report(args.output, results, matmul, args.rounds, args.threading)
    print(f"\nwrote {args.output}")


def _restart_keeping_freed_memory():
    """Runs this script again with `KEEP_FREED_MEMORY`, unless it has it already."""
    if any(os.environ.get(name) != value for name, value in KEEP_FREED_MEMORY.items()):
        # malloc reads these once, at start-up.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, **KEEP_FREED_MEMORY})


def _limit_threads():
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[name] = str(THREADS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _configure_frameworks(threading):
    import torch

    torch.set_num_threads(THREADS)
    _configure_tensorflow(threading)


def _configure_tensorflow(threading):
    import tensorflow as tf

    import keras_twins

    if threading == "streams":
        keras_twins.use_cpu_streams(THREADS)
    else:
        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def _best_times(contenders, rounds, warmup=1):
    """name -> the best time in seconds of one call, calling the contenders in turn.

    Each call starts after a pause: onnxruntime, OpenMP (torch) and Eigen
    (TensorFlow) keep their worker threads spinning for a while after a call,
    and on two cores a spinning neighbour halves the next contender's speed.
    The best, not the median: on the shared 2-vCPU machines this was written
    on, the host now and then runs both threads of a process on one core for
    seconds (either contender's call then takes twice as long, with one core
    idle), so the slower times measure the host, not the code.
    """
    for _ in range(warmup):
        for function in contenders.values():
            function()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, function in contenders.items():
            time.sleep(PAUSE)
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def _bench_variant(variant, rounds):
    import keras
    import numpy as np
    import timm
    import torch

    import keras_twins
    from keras_twins import training
    from keras_twins.export import export
    from keras_twins.flops import count_macs

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
    torch_images = torch.from_numpy(
        ((images / 255 - 0.45) / 0.225).transpose(0, 3, 1, 2).copy())
    flops = 2 * count_macs(**keras_twins.VARIANTS[variant]["config"])  # per image

    keras_model = keras_twins.CONSTRUCTORS[variant](input_shape=(SIZE, SIZE, 3))
    spread_like_trained(keras_model)
    timm_model = timm.create_model(variant, pretrained=False).eval()

    # Throughput over a few batches per call, as predict and fit are used:
    # each Keras call has a fixed set-up (its data adapter, ~0.1 s) that a
    # single batch would charge in full to one step.
    many_images = np.concatenate([images] * BATCHES)

    def timm_eager():
        with torch.inference_mode():
            for _ in range(BATCHES):
                timm_model(torch_images)

    print("  inference...", flush=True)
    inference = _best_times({
        "keras_predict": lambda: keras_model.predict(many_images, batch_size=BATCH, verbose=0),
        "timm_eager": timm_eager,
    }, rounds)

    print("  export...", flush=True)
    folder = tempfile.mkdtemp(prefix="keras_twins_bench_")
    calibration = os.path.join(folder, "calibration")
    os.makedirs(calibration)
    from PIL import Image

    for i, image in enumerate(images[:8]):
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(calibration, f"{i}.png"))
    float32_file = export(keras_model, os.path.join(folder, "float32.tflite"),
                          image_size=(SIZE, SIZE))
    int8_file = export(keras_model, os.path.join(folder, "int8.tflite"), quantize="int8",
                       representative_data=calibration, image_size=(SIZE, SIZE))
    mixed_file = export(keras_model, os.path.join(folder, "int8_mixed.tflite"),
                        quantize="int8-mixed", representative_data=calibration,
                        image_size=(SIZE, SIZE))
    onnx_file = os.path.join(folder, "timm.onnx")
    torch.onnx.export(timm_model, torch_images[:1], onnx_file, opset_version=17,
                      dynamo=False)
    print("  latency...", flush=True)
    single = images[:1]
    latency = _best_times({
        "tflite_float32": _litert(float32_file, single),
        "tflite_int8": _litert(int8_file, single),
        "tflite_int8_mixed": _litert(mixed_file, single),
        "onnxruntime_timm": _onnxruntime(onnx_file, torch_images[:1].numpy()),
    }, rounds * 4)

    print("  training...", flush=True)
    keras.utils.set_random_seed(0)
    trainee = keras_twins.CONSTRUCTORS[variant](input_shape=(SIZE, SIZE, 3),
                                                drop_path_rate=0.2)
    training.compile_for_training(trainee, training.make_optimizer(trainee, 1e-4))
    labels = keras.utils.to_categorical(rng.integers(0, 1000, BATCH), 1000)
    import tensorflow as tf

    # Without tf.data's autotuning thread, as keras_twins' own pipelines: it
    # can hold up the end of a `fit` call by seconds (keras_twins/data.py).
    options = tf.data.Options()
    options.autotune.enabled = False
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat(BATCHES)
    batches = batches.with_options(options).prefetch(1)
    trainee.fit(batches, epochs=1, verbose=0)  # traces the step
    timm_trainee = timm.create_model(variant, pretrained=False, drop_path_rate=0.2).train()
    optimizer = torch.optim.AdamW(timm_trainee.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    targets = torch.from_numpy(labels.argmax(-1))

    def timm_steps():
        for _ in range(BATCHES):
            optimizer.zero_grad()
            loss_fn(timm_trainee(torch_images), targets).backward()
            torch.nn.utils.clip_grad_norm_(timm_trainee.parameters(), 5.0)
            optimizer.step()

    steps = _best_times({
        "keras_fit": lambda: trainee.fit(batches, epochs=1, verbose=0),
        "timm_train_step": timm_steps,
    }, rounds)

    measured = {
        "gflop_per_image": flops / 1e9,
        "keras_predict_img_s": BATCH * BATCHES / inference["keras_predict"],
        "timm_eager_img_s": BATCH * BATCHES / inference["timm_eager"],
        "tflite_float32_ms": latency["tflite_float32"] * 1e3,
        "tflite_int8_ms": latency["tflite_int8"] * 1e3,
        "tflite_int8_mixed_ms": latency["tflite_int8_mixed"] * 1e3,
        "onnxruntime_timm_ms": latency["onnxruntime_timm"] * 1e3,
        "keras_fit_img_s": BATCH * BATCHES / steps["keras_fit"],
        "timm_train_img_s": BATCH * BATCHES / steps["timm_train_step"],
        "tflite_float32_mb": os.path.getsize(float32_file) / 1e6,
        "tflite_int8_mb": os.path.getsize(int8_file) / 1e6,
        "tflite_int8_mixed_mb": os.path.getsize(mixed_file) / 1e6,
    }
    shutil.rmtree(folder)  # the exported files, about 250 MB per variant
    return measured


def spread_like_trained(model, spread=0.1, seed=0):
    """Norm scales near 1, shifts and biases near 0, as in a trained model.

    Keras starts every norm scale at exactly 1 and every shift and bias at
    0. Exported as it is, a LayerNorm that follows another sees a mean of 0,
    or nearly, in every token: calibration gives that mean a scale of ~1e-8, XNNPACK
    refuses the int8 SUB that centres the tokens (its input-to-output scale
    ratio must be at least 1/1024), and LiteRT runs it in its reference
    kernel. `perf` put 10% of the full-integer file's CPU time there, and
    SVT-S's int8 files ran 4-7 ms slower than with these values spread (a
    2-core EPYC; spreads of 0.02, 0.1 and 0.5 gave the same times). A
    trained model has no such zero-mean norms. The float files' speed does
    not depend on the values.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    for weight in model.weights:
        if len(weight.shape) == 1:
            centre = 1.0 if weight.path.endswith("gamma") else 0.0
            values = centre + spread * rng.standard_normal(weight.shape)
            weight.assign(values.astype(weight.dtype))


def _litert(path, image, threads=THREADS):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]

    def run():
        interpreter.set_tensor(index, image)
        interpreter.invoke()

    return run


def _onnxruntime(path, image):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: image})


def _matmul_gflops(n=2048, repeats=10):
    """float32 matrix-multiply rate on all threads, in TensorFlow and torch.

    TensorFlow runs one matmul per thread in one call: with streams each runs
    on its own thread, without they run in turn on all of them.
    """
    import numpy as np
    import tensorflow as tf
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    tf_a, torch_a = tf.constant(a), torch.from_numpy(a)
    tf_matmuls = tf.function(lambda: [tf.matmul(tf_a, tf_a) for _ in range(THREADS)])
    times = _best_times({"tensorflow": lambda: [m.numpy() for m in tf_matmuls()],
                         "torch": lambda: [torch.mm(torch_a, torch_a) for _ in range(THREADS)]},
                        repeats)
    return {name: THREADS * 2 * n ** 3 / seconds / 1e9 for name, seconds in times.items()}


def _memory_in_subprocess(process, variant, threading):
    result = subprocess.run([sys.executable, __file__, "--memory", process, "--variant", variant,
                             "--threading", threading],
                            capture_output=True, text=True, timeout=1200,
                            env=_default_malloc({**os.environ, "OMP_NUM_THREADS": str(THREADS)}))
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def _default_malloc(environment):
    return {name: value for name, value in environment.items()
            if name not in KEEP_FREED_MEMORY}


def _peak_memory(process, variant, threading):
    """Peak resident MB of this process after inference at batch 16."""
    import numpy as np

    _limit_threads()
    images = np.random.default_rng(0).uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype(
        np.float32)
    if process == "timm":
        import timm
        import torch

        torch.set_num_threads(THREADS)
        model = timm.create_model(variant, pretrained=False).eval()
        with torch.inference_mode():
            for _ in range(3):
                model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    else:
        # As keras_twins installs: without jax. TensorFlow's TFLite module
        # imports jax where it is installed (the test extras install it),
        # and that added 109 MB to this process, before any model.
        sys.modules["jax"] = None
        import keras_twins

        _configure_tensorflow(threading)
        model = keras_twins.CONSTRUCTORS[variant](input_shape=(SIZE, SIZE, 3))
        for _ in range(3):
            model.predict(images, batch_size=BATCH, verbose=0)
    # VmHWM, not ru_maxrss: the latter carries the parent's peak over fork.
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"peak_mb": peak_kb / 1024}


def _write_report(path, results, matmul, rounds, threading):
    import keras
    import onnxruntime
    import tensorflow as tf
    import timm
    import torch

    matmul_rate = max(matmul.values())
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`benchmarks/bench.py`) on "
        f"{datetime.date.today().isoformat()}: {_cpu()}, {THREADS} threads for every "
        f"contender, {SIZE}x{SIZE} float32, best of {rounds} alternating rounds "
        f"({rounds * 4} for batch-1 latency), random weights; the exported model's "
        "norm scales and biases are spread as a trained model's "
        "(`spread_like_trained`: with Keras' initial 1 and 0, SVT-S's int8 files ran "
        "4-7 ms slower).",
        "",
        "On a GPU (Keras on JAX against timm): `benchmarks/GPU.md`, written by "
        "`benchmarks/bench_gpu.py`.",
        "",
        f"Versions: keras {keras.__version__}, tensorflow {tf.__version__}, torch "
        f"{torch.__version__}, timm {timm.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, Python {platform.python_version()}.",
        "",
        ("keras_twins runs with `keras_twins.use_cpu_streams(2)`: one thread per op and "
         "each batch as 2 slices, one per thread (README, Performance)."
         if threading == "streams" else
         "keras_twins runs with TensorFlow splitting each op over the threads "
         "(`--threading per-op`), without `use_cpu_streams`."),
        "",
        "Timed runs keep freed memory in the process ("
        + ", ".join(f"`{name}={value}`" for name, value in KEEP_FREED_MEMORY.items())
        + "): with glibc's defaults, timm's batches took up to 1.4x longer in a fresh "
        "process than in one whose heap had grown. Memory runs use the defaults; each "
        f"peak is the median of {MEMORY_RUNS} processes per framework, alternating (the "
        "range is listed below the table). keras_twins' process runs without jax, as "
        "keras_twins installs (TensorFlow imports jax where it is installed); timm's maps "
        "the CUDA libraries of PyTorch's default Linux build.",
        "",
        f"float32 matrix multiply (2048x2048, {THREADS} at a time) on this machine: "
        + ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in matmul.items()) + ".",
        "",
        "| variant | measure | keras_twins | reference | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        rows = [
            ("inference, batch 16 (img/s)", r["keras_predict_img_s"], "timm eager",
             r["timm_eager_img_s"], r["keras_predict_img_s"] / r["timm_eager_img_s"], ">= 1.2x"),
            ("TFLite float32 batch-1 latency (ms)", r["tflite_float32_ms"],
             "onnxruntime on timm's ONNX", r["onnxruntime_timm_ms"],
             r["tflite_float32_ms"] / r["onnxruntime_timm_ms"], "<= 1.0x"),
            ("TFLite int8-mixed batch-1 latency (ms)", r["tflite_int8_mixed_ms"],
             "TFLite float32", r["tflite_float32_ms"],
             r["tflite_int8_mixed_ms"] / r["tflite_float32_ms"], "<= 0.6x"),
            ("TFLite full-integer int8 batch-1 latency (ms)", r["tflite_int8_ms"],
             "TFLite float32", r["tflite_float32_ms"],
             r["tflite_int8_ms"] / r["tflite_float32_ms"], "<= 0.6x"),
            ("training, batch 16 (img/s)", r["keras_fit_img_s"], "timm train step",
             r["timm_train_img_s"], r["keras_fit_img_s"] / r["timm_train_img_s"], ">= 1.0x"),
            ("peak memory, inference batch 16 (MB)", r["memory_keras"], "timm eager",
             r["memory_timm"], r["memory_keras"] / r["memory_timm"], "<= 1.0x"),
        ]
        for measure, ours, name, theirs, ratio, goal in rows:
            lines.append(f"| {variant} | {measure} | {ours:.1f} | {theirs:.1f} ({name}) | "
                         f"{ratio:.2f}x | {goal} |")
    lines += ["", "Peak memory of each process, MB (keras_twins; timm):", ""]
    for variant, r in results.items():
        lines.append(f"- {variant}: "
                     + "; ".join(", ".join(f"{mb:.0f}" for mb in r[f"memory_{process}_runs"])
                                 for process in ("keras", "timm")))
    lines += ["", "Achieved rate against the matrix multiply:", ""]
    for variant, r in results.items():
        achieved = r["keras_predict_img_s"] * r["gflop_per_image"]
        reference = r["timm_eager_img_s"] * r["gflop_per_image"]
        lines.append(f"- {variant} ({r['gflop_per_image']:.2f} GFLOP per image): "
                     f"keras_twins {achieved:.0f} GFLOP/s ({achieved / matmul_rate:.0%} of "
                     f"the matmul rate), timm {reference:.0f} GFLOP/s "
                     f"({reference / matmul_rate:.0%}).")
    temporary = f"{path}.partial"
    with open(temporary, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(temporary, path)


def _cpu():
    """The CPU's name, and whether it has AVX-512: hosts named alike differ in it."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines
                     if line.startswith("flags"))
        vector = "AVX-512" if "avx512f" in flags else "no AVX-512"
    except (OSError, StopIteration):
        return f"{platform.processor() or 'unknown CPU'} ({os.cpu_count()} cores)"
    return f"{name} ({os.cpu_count()} cores, {vector})"


if __name__ == "__main__":
    main()
