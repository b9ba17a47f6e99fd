import pytest

import keras_twins
from keras_twins.flops import count_macs

# GMACs at 224 from an independent count of the reference's matmuls and
# convolutions (twins-spec.md, "matmul+conv MAC estimate"); timm reports
# 3.83 / 6.68 / 9.84 / 2.94 / 8.59 / 15.15 for the same models.
INDEPENDENT_GMACS = {
    "twins_pcpvt_small": 3.81, "twins_pcpvt_base": 6.65, "twins_pcpvt_large": 9.81,
    "twins_svt_small": 2.93, "twins_svt_base": 8.56, "twins_svt_large": 15.11,
}


@pytest.mark.parametrize("variant", list(INDEPENDENT_GMACS))
def test_macs_at_224_match_an_independent_count(variant):
    config = keras_twins.VARIANTS[variant]["config"]
    assert round(count_macs(**config) / 1e9, 2) == INDEPENDENT_GMACS[variant]



def test_the_stem_counts_the_images_channels():
    config = keras_twins.VARIANTS["twins_svt_small"]["config"]
    # The first convolution: 56x56 patches of 4x4 pixels, 64 outputs each.
    per_channel = 56 * 56 * 64 * 4 * 4
    rgb = count_macs(**config)
    assert rgb - count_macs(**config, channels=1) == 2 * per_channel
    assert count_macs(**config, channels=4) - rgb == per_channel
