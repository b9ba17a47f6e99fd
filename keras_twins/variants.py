"""The one table of Twins variants.

Used by the constructors, the converter's variant detection, the README
table and the demo. Architecture figures follow the paper (Chu et al., 2021,
Tables 1-2) and timm's `twins.py`; the accuracy and compute figures are the
published ones (official README / paper and timm's `results-imagenet.csv`).
"""

# ImageNet preprocessing used for training and evaluation by both references.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
CROP_PCT = 0.9  # timm: resize the shorter side to int(224 / 0.9), crop 224.
SR_RATIOS = (8, 4, 2, 1)


def min_image_size(patch_size, sr_ratios, depths=None, window_sizes=None):
    """The smallest image side a Twins network takes: every stage's map
    (stride `patch_size * 2**stage`) must keep at least one token after its
    GSA sub-sampling by `sr_ratios[stage]`. With `depths` and `window_sizes`
    (SVT), a stage of one block has only LSA and sub-samples nothing.
    32 for the six variants."""
    if window_sizes is None or depths is None:
        lsa_only = [False] * len(sr_ratios)
    else:
        lsa_only = [depth < 2 for depth in depths]  # SVT's GSA blocks are its odd ones
    return max(patch_size * 2**stage * (1 if lsa else max(sr, 1))
               for stage, (sr, lsa) in enumerate(zip(sr_ratios, lsa_only)))


MIN_IMAGE_SIZE = min_image_size(4, SR_RATIOS)

_PCPVT = dict(sr_ratios=SR_RATIOS, window_sizes=None, mlp_ratios=(8, 8, 4, 4))
_SVT = dict(sr_ratios=SR_RATIOS, window_sizes=(7, 7, 7, 7), mlp_ratios=(4, 4, 4, 4))

# name -> architecture (the keyword arguments of `keras_twins.Twins`) and
# published figures: parameters, GFLOPs at 224 (paper/official README,
# fvcore), ImageNet-1k top-1 (paper; timm's evaluation of the same weights).
VARIANTS = {
    "twins_pcpvt_small": dict(
        config=dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3),
                    num_heads=(1, 2, 5, 8), **_PCPVT),
        params=24_106_216, paper_gflops=3.7, paper_top1=81.2, timm_top1=81.116,
    ),
    "twins_pcpvt_base": dict(
        config=dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3),
                    num_heads=(1, 2, 5, 8), **_PCPVT),
        params=43_828_456, paper_gflops=6.4, paper_top1=82.7, timm_top1=82.724,
    ),
    "twins_pcpvt_large": dict(
        config=dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3),
                    num_heads=(1, 2, 5, 8), **_PCPVT),
        params=60_989_672, paper_gflops=9.5, paper_top1=83.1, timm_top1=83.158,
    ),
    "twins_svt_small": dict(
        config=dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 10, 4),
                    num_heads=(2, 4, 8, 16), **_SVT),
        params=24_060_776, paper_gflops=2.8, paper_top1=81.7, timm_top1=81.694,
    ),
    "twins_svt_base": dict(
        config=dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2),
                    num_heads=(3, 6, 12, 24), **_SVT),
        params=56_070_952, paper_gflops=8.3, paper_top1=83.2, timm_top1=83.122,
    ),
    "twins_svt_large": dict(
        config=dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                    num_heads=(4, 8, 16, 32), **_SVT),
        params=99_271_400, paper_gflops=14.8, paper_top1=83.7, timm_top1=83.718,
    ),
}


def get_variant(name):
    """Returns the table entry of `name`, with a clear error for unknown names."""
    if name not in VARIANTS:
        raise ValueError(
            f"Unknown Twins variant {name!r}. Known variants: "
            f"{', '.join(VARIANTS)}."
        )
    return VARIANTS[name]


def find_variant(**config):
    """Names the variant whose architecture is `config`, or returns None."""
    normalized = {k: None if v is None else tuple(v) for k, v in config.items()}
    for name, entry in VARIANTS.items():
        if all(normalized[k] == entry["config"][k] for k in normalized):
            return name
    return None
