"""The README's variants table is the variants table."""

import pathlib

import keras_twins
from keras_twins.flops import count_macs

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_variant_rows_agree_with_the_table():
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in keras_twins.VARIANTS:
            rows[cells[0]] = cells
    assert set(rows) == set(keras_twins.VARIANTS)
    for name, entry in keras_twins.VARIANTS.items():
        _, constructor, params, macs, gflops, top1_paper, top1_timm = rows[name]
        assert getattr(keras_twins, constructor.strip("`"))().name == name
        assert params == f"{entry['params']:,}"
        assert macs == f"{count_macs(**entry['config']) / 1e9:.2f}"
        assert float(gflops) == entry["paper_gflops"]
        assert float(top1_paper) == entry["paper_top1"]
        assert float(top1_timm) == entry["timm_top1"]
