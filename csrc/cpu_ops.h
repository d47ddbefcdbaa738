// fastres._cpu: the CPU backend's own kernels (float32, NHWC = channels_last tensors), one family
// per file: winograd_cpu.cpp (3x3 convolutions as Winograd F(2x2, 3x3) and F(4x4, 3x3)),
// pool_cpu.cpp (the stem's 3x3 stride-2 max pool, the head's mean over the pixels);
// cpu_bindings.cpp exposes them to Python (fastres/cpu_kernels.py).
#pragma once

#include <torch/extension.h>

namespace fastres_cpu {

// A 4-D float32 CPU tensor, channels_last contiguous, or an error naming the op and the argument.
inline void check_nhwc(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4, "fastres._cpu.", op, ": ",
              name, " must be a 4-D float32 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "fastres._cpu.", op, ": ", name,
              " must be channels_last contiguous");
}

// relu?(conv2d(x, w, padding=1) + bias (+ residual)) for u = fastres.winograd.transform_weight(w, side).
at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias,
                   const c10::optional<at::Tensor>& residual, bool relu);

// F.max_pool2d(x, 3, stride=2, padding=1), bit for bit (NaN propagates as in PyTorch).
at::Tensor max_pool3x3s2(const at::Tensor& x);

// x.mean((2, 3)) as a contiguous [N, C] tensor: each image's pixels summed in order in double.
at::Tensor global_mean(const at::Tensor& x);

}  // namespace fastres_cpu
