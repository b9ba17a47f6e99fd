"""Multiply-accumulate count of a Twins configuration at a given image size.

Counts the convolutions, the linear layers and the two attention matmuls,
which is what the papers of this family report as "FLOPs" (one
multiply-accumulate each). LSA counts its padded tokens, since the qkv
projection and the window attention run on them.
"""


def count_macs(embed_dims, depths, num_heads, mlp_ratios, sr_ratios,
               window_sizes=None, patch_size=4, image_size=(224, 224), classes=1000,
               channels=3):
    """Returns the multiply-accumulates of one forward pass of one image of `channels`."""
    del num_heads  # heads split channels; they do not change the count
    height, width = image_size
    channels_in = channels
    total = 0
    for stage, dim in enumerate(embed_dims):
        patch = patch_size if stage == 0 else 2
        height, width = height // patch, width // patch
        tokens = height * width
        total += tokens * dim * channels_in * patch * patch
        hidden = int(dim * mlp_ratios[stage])
        for i in range(depths[stage]):
            window = 1 if window_sizes is None or i % 2 else window_sizes[stage]
            if window > 1:
                padded_h = -(-height // window) * window
                padded_w = -(-width // window) * window
                padded = padded_h * padded_w
                total += padded * dim * 3 * dim  # qkv
                total += 2 * padded * window * window * dim  # q k^T and weights v
            else:
                sr = sr_ratios[stage]
                summary = (height // sr) * (width // sr)
                total += tokens * dim * dim  # q
                if sr > 1:
                    total += summary * dim * dim * sr * sr  # sub-sampling conv
                total += summary * dim * 2 * dim  # kv
                total += 2 * tokens * summary * dim  # q k^T and weights v
            total += tokens * dim * dim  # output projection
            total += 2 * tokens * dim * hidden  # MLP
            if i == 0:
                total += tokens * dim * 9  # PEG depthwise 3x3
        channels_in = dim
    return total + embed_dims[-1] * classes
