"""`make demo`'s job runs offline: train, export, evaluate, one table."""

import importlib.util
import os
import pathlib
import subprocess
import sys

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_trains_exports_and_prints_its_table(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(DEMO), "--output", str(output)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    names = ("Keras (TensorFlow)", "TFLite float32", "TFLite int8", "TFLite int8-mixed")
    rows = {}
    for line in result.stdout.splitlines():
        for name in names:
            if line.startswith(name + " "):
                cells = line[len(name):].split()
                rows[name] = [float(cell.rstrip("%")) for cell in cells]
    assert set(rows) == set(names), result.stdout
    print("\n" + "\n".join(f"{name}: {cells}" for name, cells in rows.items()))
    keras_top1, _, keras_mb, keras_ms = rows["Keras (TensorFlow)"]
    # From timm's initialization, runs with a parallel input order scored
    # 95.8% to 96.9% (from Glorot's, 97.8%); the demo now trains
    # deterministically, and 94% leaves other CPUs' arithmetic some room.
    assert keras_top1 >= 94.0
    float32_top1, float32_agreement, float32_mb, _ = rows["TFLite float32"]
    int8_top1, int8_agreement, int8_mb, int8_ms = rows["TFLite int8"]
    # float32 is the same network; int8 keeps the trained model's decisions.
    assert float32_agreement >= 99.5 and abs(float32_top1 - keras_top1) <= 0.5
    assert int8_agreement >= 95.0 and int8_top1 >= 93.0
    assert int8_mb <= 0.4 * float32_mb
    mixed_top1, mixed_agreement, mixed_mb, mixed_ms = rows["TFLite int8-mixed"]
    assert mixed_agreement >= 95.0 and mixed_top1 >= 93.0
    assert mixed_mb <= 0.4 * float32_mb
    assert keras_ms > 0 and int8_ms > 0 and mixed_ms > 0
    assert (output / "run" / "training.png").stat().st_size > 10_000
    assert (output / "digits_int8.tflite").exists()
    assert (output / "digits_int8_mixed.tflite").exists()
    # The exports' labels are the digits the run trained on, not class_0, ...
    assert (output / "labels.txt").read_text().split() == [str(i) for i in range(10)]

    # The next run replaces this folder: it holds only what the demo writes.
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.is_demo_folder(output), sorted(os.listdir(output))

    # A folder of other files is never deleted, even one with a digits/ folder.
    (tmp_path / "mine" / "digits").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for other in (tmp_path, tmp_path / "mine", tmp_path / "mine" / "notes.txt"):
        again = subprocess.run([sys.executable, str(DEMO), "--output", str(other)],
                               capture_output=True, text=True, timeout=300)
        assert again.returncode != 0 and "not a demo folder" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
