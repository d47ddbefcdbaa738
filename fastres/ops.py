"""Public fastres ops, usable on their own next to ``torch.nn.functional``.

Activations are ordinary ``[N, C, H, W]`` tensors in ``torch.channels_last`` memory; weights are in
PyTorch's layout and packed by the op (the plan packs once and calls the packed entry points).

* Triton kernels: ``conv2d_nhwc``, ``max_pool2d_nhwc``, ``avgpool_linear``.
* CUDA C++ extension (C++ CPU twins on CPU tensors; also ``torch.ops.fastres.*``): ``preprocess``,
  ``nchw_to_nhwc``, ``nhwc_to_nchw``.
* Normalisation folded into the stem: ``fold_normalization_into_stem`` and its reference.
"""
from .extension import extension_status, load_extension, nchw_to_nhwc, nhwc_to_nchw, preprocess  # noqa: F401
from .kernels.avgpool_linear import avgpool_linear  # noqa: F401
from .kernels.conv2d_nhwc import conv2d_nhwc  # noqa: F401
from .kernels.max_pool2d_nhwc import max_pool2d_nhwc  # noqa: F401
from .normalize import fold_normalization_into_stem, folded_stem_conv_ref, pad_per_channel  # noqa: F401
