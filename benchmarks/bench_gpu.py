"""keras_twins on a GPU against timm on the same GPU, through Keras' JAX backend.

    KERAS_BACKEND=jax python benchmarks/bench_gpu.py [--variants twins_svt_small ...]
                                                     [--batch 64] [--rounds 5] [--output FILE]
    python benchmarks/bench_gpu.py --render RESULTS.json [MORE.json ...] [--output MERGED.json]

For each variant, in one process, alternating the contenders round by round
and reporting the median of the rounds:

- parity: timm with random weights (norm scales and all biases randomized
  too), converted to Keras through `weights=model.safetensors`; logits of 8
  images at 224x224 on the GPU, against timm's in IEEE float32. Keras runs
  once at JAX's "highest" matmul precision (the parity tests' bound
  1e-5 * max(1, max|ref|) applies) and once at JAX's default, which on
  NVIDIA GPUs multiplies float32 in TF32;
- inference at `--batch`, host arrays in and out (`model.predict` against
  timm in eager mode under `torch.no_grad`, its input copied to the GPU and
  its logits back): in float32 with TF32 matmuls on both sides, and in
  bfloat16 (Keras' `mixed_bfloat16` policy against `torch.autocast`);
- training at `--batch` in bfloat16: `model.fit` over host arrays (AdamW with
  the recipe's weight-decay exclusions, global-norm clipping 5.0, label
  smoothing 0.1, drop path 0.2) against timm's step (AdamW, autocast,
  clip_grad_norm_ 5.0, label smoothing 0.1, drop path 0.2);
- peak GPU memory of each in that inference, from the allocators' own
  counters (JAX's `peak_bytes_in_use`, torch's `max_memory_allocated`).

TensorFlow's GPU build is not needed: keras_twins builds, converts and runs
on JAX without TensorFlow (training.py, which needs it, is used when it
imports). Writes JSON to --output and its table to benchmarks/GPU.md after
each finished measurement, so a run cut short keeps what it measured;
`--render` merges the JSON of several runs on one machine into the table
(benchmarks/gpu_results.json holds the runs GPU.md shows). Not a test:
nothing here asserts a time.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
# Both frameworks share the GPU: JAX takes memory as it needs it, not 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import keras_twins  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
SIZE = 224
CLASSES = 1000
PARITY_IMAGES = 8
MARKDOWN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "GPU.md")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["twins_svt_small", "twins_pcpvt_small"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "inference", "train"])
    parser.add_argument("--output", help="the results, as JSON (default: bench_gpu.json; "
                        "with --render, the merged results, where given)")
    parser.add_argument("--markdown", help="the results' table (default: benchmarks/GPU.md, "
                        "where the machine has a GPU)")
    parser.add_argument("--render", nargs="+", metavar="JSON",
                        help="measure nothing: merge these results into --markdown")
    args = parser.parse_args()
    if args.render:
        results = merged(args.render)
        if args.output:
            save(results, args.output)
        return write_markdown(results, args.markdown or MARKDOWN)
    args.output = args.output or "bench_gpu.json"
    if keras.backend.backend() != "jax":
        sys.exit("bench_gpu.py runs Keras on JAX, and KERAS_BACKEND is "
                 f"{keras.backend.backend()!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.markdown is None and device.type == "cuda":
        args.markdown = MARKDOWN
    elif args.markdown is None:
        print("No GPU: a trial run, and benchmarks/GPU.md is left as it is.", flush=True)
    results = {"machine": machine(device), "batch": args.batch, "size": args.size,
               "variants": {}}
    save(results, args.output)
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variants:
            entry = results["variants"].setdefault(variant, {})
            weights = reference_weights(variant, scratch)
            steps = [("parity", parity), ("inference", inference), ("train", training)]
            for name, measure in steps:
                if name in args.skip:
                    continue
                started = time.perf_counter()
                entry[name] = measure(variant, weights, device, args)
                entry[name]["seconds"] = round(time.perf_counter() - started, 1)
                if name != "parity":
                    entry[name].update(rounds=args.rounds, batches=args.batches)
                print(variant, name, json.dumps(entry[name]), flush=True)
                save(results, args.output)
                if args.markdown:
                    write_markdown(results, args.markdown)
    return results


def machine(device):
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {m.__name__: m.__version__ for m in (jax, keras, torch, timm, np)},
        "date": time.strftime("%Y-%m-%d"),
    }


def save(results, path):
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(partial, path)


def merged(paths):
    """The results of several runs on one machine, as one: each variant's
    measurements from the last run that made them."""
    results = None
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        if results is None:
            results = run
            continue
        if run["machine"]["gpu"] != results["machine"]["gpu"]:
            sys.exit(f"{path} was measured on {run['machine']['gpu']}, the first file on "
                     f"{results['machine']['gpu']}: merge runs of one machine")
        for variant, entry in run["variants"].items():
            results["variants"].setdefault(variant, {}).update(entry)
    return results


def write_markdown(results, path):
    machine = results["machine"]
    versions = machine["versions"]
    lines = [
        "# keras_twins on a GPU",
        "",
        f"Written by `benchmarks/bench_gpu.py` from runs on {machine['date']}: "
        f"{machine['gpu']}, Keras {versions['keras']} on JAX {versions['jax']} (XLA), "
        f"against timm {versions['timm']} on torch {versions['torch']} in eager mode "
        "(torch.compile is not measured), in the same process on the same GPU. "
        f"{results['size']}x{results['size']}, batch {results['batch']}, random weights; "
        "each figure is the median of alternating "
        "rounds, each round a call over host arrays, its outputs back on the host.",
        "",
        "Keras runs on JAX here; TensorFlow on a GPU is not measured. The CPU figures, "
        "TensorFlow's, are in BENCHMARKS.md.",
        "",
        "| variant | measure | keras_twins | timm | ratio | rounds x batches |",
        "|---|---|---|---|---|---|",
    ]
    for variant, entry in results["variants"].items():
        rows = []
        for dtype, label in [("float32", "inference, float32 with TF32 matmuls"),
                             ("bfloat16", "inference, bfloat16")]:
            if dtype in entry.get("inference", {}):
                rows.append((label, entry["inference"][dtype], entry["inference"]))
        if "train" in entry:
            rows.append(("training, bfloat16, AdamW, clipping 5.0, drop path 0.2",
                         entry["train"], entry["train"]))
        for label, r, step in rows:
            lines.append(f"| {variant} | {label} (img/s) | {r['keras_images_per_s']:.0f} | "
                         f"{r['timm_images_per_s']:.0f} | {r['ratio']:.2f}x | "
                         f"{step.get('rounds', '?')} x {step.get('batches', '?')} |")
    lines += ["", "Parity on the GPU: logits of 8 images against timm's in IEEE float32 "
              "(the parity tests' bound is 1e-5 x max(1, max|logit|)):", ""]
    for variant, entry in results["variants"].items():
        p = entry.get("parity")
        if p:
            lines.append(
                f"- {variant}: max|diff| {p['max_diff_highest']:.2g} at JAX's \"highest\" "
                f"matmul precision (bound {p['bound']:.2g}), {p['max_diff_default']:.2g} at "
                f"its default, TF32 (top-1 agrees on {p['top1_agreement_default']:.0%}), "
                f"{p['max_diff_bfloat16']:.2g} in bfloat16.")
    memory = []
    for variant, entry in results["variants"].items():
        r = entry.get("inference")
        if r and r["keras_peak_mb"] is not None and "timm_peak_mb" in r["float32"]:
            memory.append(
                f"- {variant}: timm {r['float32']['timm_peak_mb']:.0f} MB (float32), "
                f"{r['bfloat16']['timm_peak_mb']:.0f} MB (bfloat16); JAX "
                f"{r['keras_peak_mb']:.0f} MB, its peak since the process began (it has no "
                "reset): " + ("the parity step's models and " if "parity" in entry else "")
                + "both inference runs.")
    if memory:
        lines += ["", "Peak GPU memory, from each allocator's own counter:", "", *memory]
    lines += ["", "Seconds each part took, compiling, autotuning and warm-up included:", ""]
    for variant, entry in results["variants"].items():
        steps = ("parity", "inference", "train")
        missing = [name for name in steps if name not in entry]
        lines.append(f"- {variant}: " + ", ".join(
            f"{name} {entry[name]['seconds']:.0f}" for name in steps if name in entry)
            + (f"; not measured: {', '.join(missing)}" if missing else ""))
    temporary = f"{path}.partial"
    with open(temporary, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(temporary, path)


def reference_weights(variant, scratch):
    """A timm model's random weights, norms and biases randomized too, as .safetensors."""
    import safetensors.torch

    torch.manual_seed(0)
    model = timm.create_model(variant, pretrained=False, num_classes=CLASSES)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                offset = 1.0 if name.endswith("weight") and "norm" in name else 0.0
                parameter.copy_(torch.randn_like(parameter) * 0.5 + offset)
    path = os.path.join(scratch, f"{variant}.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def timm_model(variant, weights, device, **kwargs):
    import safetensors.torch

    model = timm.create_model(variant, pretrained=False, num_classes=CLASSES, **kwargs)
    model.load_state_dict(safetensors.torch.load_file(weights))
    return model.to(device)


def keras_model(variant, weights, size, **kwargs):
    return keras_twins.CONSTRUCTORS[variant](
        weights=weights, input_shape=(size, size, 3), classifier_activation=None, **kwargs)


def images(count, size, seed=0):
    """Images in [0, 255], NHWC for Keras (which normalizes them inside) and
    normalized NCHW for timm."""
    pixels = np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3))
    pixels = pixels.astype(np.float32)
    return pixels, np.ascontiguousarray(((pixels - MEAN) / STD).transpose(0, 3, 1, 2))


def parity(variant, weights, device, args):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pixels, normalized = images(PARITY_IMAGES, args.size, seed=1)
    reference = timm_model(variant, weights, device).eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(normalized).to(device)).float().cpu().numpy()
    bound = 1e-5 * max(1.0, float(np.abs(expected).max()))
    model = keras_model(variant, weights, args.size)
    report = {"bound": bound}
    for precision in ("highest", "default"):
        with jax.default_matmul_precision(precision):
            logits = np.asarray(model.predict(pixels, batch_size=PARITY_IMAGES, verbose=0))
        report[f"max_diff_{precision}"] = float(np.abs(logits - expected).max())
        report[f"top1_agreement_{precision}"] = float(
            np.mean(logits.argmax(-1) == expected.argmax(-1)))
    with dtype_policy("mixed_bfloat16"):
        half = keras_model(variant, weights, args.size)
    logits = np.asarray(half.predict(pixels, batch_size=PARITY_IMAGES, verbose=0), np.float32)
    report["max_diff_bfloat16"] = float(np.abs(logits - expected).max())
    report["max_abs_reference"] = float(np.abs(expected).max())
    report["within_bound_highest"] = report["max_diff_highest"] <= bound
    return report


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy set to `name` while the models inside are built."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def timed(contenders, rounds):
    """Median seconds of each contender's call, the contenders alternating round by round."""
    for run in contenders.values():
        run()  # compiles, autotunes and warms the allocators
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def gpu_sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def jax_peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def inference(variant, weights, device, args):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = {dtype: inference_in(dtype, variant, weights, device, args)
              for dtype in ("float32", "bfloat16")}
    peak = jax_peak_bytes()  # JAX's counter has no reset: its peak over both dtypes
    report["keras_peak_mb"] = None if peak is None else peak / 2**20
    return report


def inference_in(dtype, variant, weights, device, args):
    count = args.batch * args.batches
    pixels, normalized = images(count, args.size)
    with dtype_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32"):
        model = keras_model(variant, weights, args.size)
    reference = timm_model(variant, weights, device).eval()

    def run_keras():
        return model.predict(pixels, batch_size=args.batch, verbose=0)

    def run_timm():
        outputs = []
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                             enabled=dtype == "bfloat16"):
            for start in range(0, count, args.batch):
                batch = torch.from_numpy(normalized[start:start + args.batch])
                outputs.append(reference(batch.to(device, non_blocking=True)).float().cpu())
        gpu_sync(device)
        return torch.cat(outputs).numpy()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed({"keras": run_keras, "timm": run_timm}, args.rounds)
    report = {
        "keras_images_per_s": count / seconds["keras"],
        "timm_images_per_s": count / seconds["timm"],
        "ratio": seconds["timm"] / seconds["keras"],
    }
    if device.type == "cuda":
        report["timm_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def keras_optimizer(model):
    """The recipe's optimizer: keras_twins.training's where TensorFlow is
    installed; else Keras' AdamW with the same exclusions and clipping (on
    one device the two compute the same update)."""
    try:
        from keras_twins import training
    except ImportError:
        from keras_twins.model import no_weight_decay_variables

        optimizer = keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.05,
                                           epsilon=1e-8, global_clipnorm=5.0)
        optimizer.exclude_from_weight_decay(var_list=no_weight_decay_variables(model))
        return optimizer, "keras.optimizers.AdamW (TensorFlow not installed)"
    return training.make_optimizer(model, 1e-4), "keras_twins.training.make_optimizer"


def training(variant, weights, device, args):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    count = args.batch * args.batches
    pixels, normalized = images(count, args.size, seed=2)
    labels = np.random.default_rng(3).integers(0, CLASSES, count)
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]

    with dtype_policy("mixed_bfloat16"):
        model = keras_model(variant, weights, args.size, drop_path_rate=0.2)
    optimizer, which = keras_optimizer(model)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                            label_smoothing=0.1),
                  jit_compile=True)

    reference = timm_model(variant, weights, device, drop_path_rate=0.2).train()
    decay = [p for n, p in reference.named_parameters() if p.ndim > 1 and "pos_block" not in n]
    rest = [p for n, p in reference.named_parameters() if p.ndim <= 1 or "pos_block" in n]
    torch_optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                         {"params": rest, "weight_decay": 0.0}],
                                        lr=1e-4, eps=1e-8)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    torch_labels = torch.from_numpy(labels)

    def run_keras():
        return model.fit(pixels, one_hot, batch_size=args.batch, epochs=1, shuffle=False,
                         verbose=0)

    def run_timm():
        for start in range(0, count, args.batch):
            batch = torch.from_numpy(normalized[start:start + args.batch]).to(device)
            target = torch_labels[start:start + args.batch].to(device)
            with torch.autocast(device.type, torch.bfloat16):
                loss = loss_fn(reference(batch), target)
            torch_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 5.0)
            torch_optimizer.step()
        loss.item()
        gpu_sync(device)

    seconds = timed({"keras": run_keras, "timm": run_timm}, args.rounds)
    return {
        "optimizer": which,
        "keras_images_per_s": count / seconds["keras"],
        "timm_images_per_s": count / seconds["timm"],
        "ratio": seconds["timm"] / seconds["keras"],
    }


if __name__ == "__main__":
    main()
