"""`make demo`'s job runs offline, with and without a checkpoint."""

import pathlib
import subprocess
import sys

import keras_twins

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def run_demo(*args):
    return subprocess.run([sys.executable, str(DEMO), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def test_demo_prints_the_variants_table():
    result = run_demo()
    assert result.returncode == 0, result.stderr
    for name, entry in keras_twins.VARIANTS.items():
        row = next(line for line in result.stdout.splitlines() if line.startswith(name))
        assert row.split()[1] == f"{entry['params']:,}"


def test_demo_classifies_sample_photos_with_a_checkpoint(random_reference, tmp_path):
    _, directory = random_reference("twins_svt_small")
    result = run_demo("--checkpoint", directory / "model.safetensors")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith(
        ("china.jpg", "flower.jpg"))]
    assert len(lines) == 2
    for line in lines:
        probabilities = [float(p.strip("(),")) for p in line.split()[2::2]]
        assert len(probabilities) == 5 and sum(probabilities) <= 1.0 + 1e-6
    bad = run_demo("--checkpoint", tmp_path / "missing.safetensors")
    assert bad.returncode != 0 and "missing.safetensors" in bad.stderr
    assert "Traceback" not in bad.stderr
