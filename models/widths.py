"""`model.ffn.hidden: auto`: the papers' parameter-matched FFN widths, in exact integer arithmetic.

- ungated MLP: F = 4d                                  (Shazeer 2020's baseline)
- GLU family:  F = 2/3 of 4d = 8d/3                    (three matrices at 2/3 width = two at full)
- PolyCom:     F = 1.5 x the (rounded) SwiGLU width    (BryceZhuo/PolyCom run script:
               `if ACT_FUNC != swiglu: INTERMEDIATE_SIZE*3/2`; 5504 -> 8256 at d=2048)

Each is rounded up to `multiple_of`. When d is a multiple of 24 (with multiple_of 64: 8d/3 is a
multiple of 64) all three give exactly the same FFN parameter count; otherwise rounding leaves
the GLU arms up to 3 d (multiple_of - 1) parameters per layer larger.
"""
from __future__ import annotations


def round_up(numerator: int, denominator: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= numerator / denominator (integers only: no float drift)."""
    return multiple * -(-numerator // (denominator * multiple))


def mlp_width(d_model: int, multiple_of: int) -> int:
    return round_up(4 * d_model, 1, multiple_of)


def glu_width(d_model: int, multiple_of: int) -> int:
    return round_up(8 * d_model, 3, multiple_of)


def polycom_width(d_model: int, multiple_of: int) -> int:
    return round_up(3 * glu_width(d_model, multiple_of), 2, multiple_of)
