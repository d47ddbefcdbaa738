"""Normalisation folded into the ResNet stem (fastres.normalize) against normalise-then-convolve.

The reference is torchvision's normalize followed by F.conv2d with zero padding, in float64; the
folded path pads the raw pixels with 255 * mean and must agree to ~1e-10 relative at every output
pixel, border included.
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from fastres.normalize import fold_normalization_into_stem, folded_stem_conv_ref, pad_per_channel

MEAN = (0.485, 0.456, 0.406)   # torchvision's ImageNet weights
STD = (0.229, 0.224, 0.225)
STRIDE, PADDING = 2, 3          # ResNet stem: conv 7x7 / stride 2 / padding 3, 3 -> 64 channels
IMAGE_SIZES = [(1, 1, 1), (1, 7, 7), (3, 13, 17), (2, 31, 9), (1, 67, 99)]


def _stem(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(64, 3, 7, 7, generator=g) * 0.05).to(dtype)
    return weight, (torch.randn(64, generator=g).to(dtype) if bias else None)


def _images(n, h, w, seed=1):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalised_conv(images, weight, bias):
    x = TF.normalize(images.to(torch.float64) / 255, list(MEAN), list(STD))
    return F.conv2d(x, weight, bias, stride=STRIDE, padding=PADDING)


def _border_mask(h, w, out_h, out_w):
    """True at output pixels whose 7x7 window reaches into the padding."""
    rows = torch.arange(out_h) * STRIDE - PADDING
    cols = torch.arange(out_w) * STRIDE - PADDING
    inside_r = (rows >= 0) & (rows + 6 <= h - 1)
    inside_c = (cols >= 0) & (cols + 6 <= w - 1)
    return ~(inside_r[:, None] & inside_c[None, :])


@pytest.mark.parametrize("n,h,w", IMAGE_SIZES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_folded_stem_exact_in_float64(n, h, w, bias):
    weight, b = _stem(bias=bias)
    images = _images(n, h, w)
    expected = _normalised_conv(images, weight, b)

    folded = fold_normalization_into_stem(weight, b, MEAN, STD)
    got = folded_stem_conv_ref(images, *folded, stride=STRIDE, padding=PADDING)

    scale = expected.abs().max()
    assert got.shape == expected.shape and got.dtype == torch.float64
    assert (got - expected).abs().max() <= 1e-10 * scale

    # The pad value is what makes the border exact: zero padding of the raw pixels is wrong on every
    # border output pixel and right everywhere else.
    zero_padded = F.conv2d(images.double(), folded[0], folded[1], stride=STRIDE, padding=PADDING)
    border = _border_mask(h, w, *expected.shape[2:])
    error = (zero_padded - expected).abs().amax(dim=(0, 1))
    assert bool(border.any())
    assert error[border].min() > 1e-3 * scale
    assert bool((error[~border] <= 1e-10 * scale).all())


def test_pad_value_is_raw_mean():
    weight, bias = _stem()
    _, _, pad_value = fold_normalization_into_stem(weight, bias, MEAN, STD)
    torch.testing.assert_close(pad_value, 255 * torch.tensor(MEAN, dtype=torch.float64), rtol=0, atol=1e-12)


def test_float32_fold_matches_float64_fold():
    weight, bias = _stem(torch.float32)
    w32, b32, p32 = fold_normalization_into_stem(weight, bias, MEAN, STD)
    w64, b64, p64 = fold_normalization_into_stem(weight.double(), bias.double(), MEAN, STD)
    assert w32.dtype == b32.dtype == p32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), w64, rtol=1e-6, atol=0)
    torch.testing.assert_close(b32.double(), b64, rtol=1e-5, atol=1e-6)


def test_half_weight_folds_in_float32():
    weight, bias = _stem(torch.float16)
    folded_weight, folded_bias, _ = fold_normalization_into_stem(weight, bias, MEAN, STD)
    assert folded_weight.dtype == folded_bias.dtype == torch.float32


# Preprocess output dtype -> relative error of one preprocessed value (its rounding) + fp32 slack.
PREPROCESS_ROUNDING = [(torch.float32, 2.0**-23), (torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)]


@pytest.mark.parametrize("dtype,relative", PREPROCESS_ROUNDING, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n,h,w", [(1, 7, 7), (3, 13, 17), (1, 67, 99)])
def test_folded_stem_matches_extension_preprocess(n, h, w, dtype, relative):
    """preprocess(pad_channels_to=4) -> conv with a zero 4th input channel == folded stem on raw pixels."""
    from fastres.extension import preprocess

    weight, bias = _stem()
    images = _images(n, h, w)
    x = preprocess(images, MEAN, STD, dtype=dtype, pad_channels_to=4)
    assert x.shape == (n, 4, h, w)
    weight4 = torch.cat([weight, torch.zeros(64, 1, 7, 7, dtype=weight.dtype)], dim=1)
    got = F.conv2d(x.double(), weight4, bias, stride=STRIDE, padding=PADDING)

    folded = folded_stem_conv_ref(images, *fold_normalization_into_stem(weight, bias, MEAN, STD))
    # |sum W (x + e)| - |sum W x| <= sum |W| |e| with |e| <= relative * |x| + 1e-6 (fp32 math near 0).
    exact_x = TF.normalize(images.double() / 255, list(MEAN), list(STD))
    bound = F.conv2d(exact_x.abs() * relative + 1e-6, weight.abs(), stride=STRIDE, padding=PADDING)
    assert bool(((got - folded).abs() <= bound + 1e-9).all())


def test_fold_rejects_bad_input():
    weight, bias = _stem()
    with pytest.raises(ValueError, match="mean has 4 values but the stem weight has 3 input channels"):
        fold_normalization_into_stem(weight, bias, MEAN + (0.5,), STD)
    with pytest.raises(ValueError, match="std must be nonzero"):
        fold_normalization_into_stem(weight, bias, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match=r"weight must be \[C_out, C_in, KH, KW\]"):
        fold_normalization_into_stem(weight[0], bias, MEAN, STD)
    with pytest.raises(ValueError, match=r"bias must be \[64\]"):
        fold_normalization_into_stem(weight, bias[:10], MEAN, STD)
    with pytest.raises(ValueError, match=r"x must be \[N, 3, H, W\]"):
        pad_per_channel(torch.zeros(1, 4, 5, 5), torch.zeros(3), 3)
