// CPU twin of preprocess.cu: the same preprocess_group, one group per loop step instead of per thread.
#include "preprocess.h"

namespace fastres {

void preprocess_cpu(const PreprocessParams& params, OutDtype dtype, bool planar) {
  const int64_t groups = preprocess_groups(params);
  if (params.padded) {
    dispatch_preprocess_padded(dtype, planar, [&](auto dtype_tag, auto planar_tag) {
      for (int64_t q = 0; q < groups; ++q) {
        preprocess_padded_pixel<decltype(dtype_tag)::value, decltype(planar_tag)::value>(params, q);
      }
    });
    return;
  }
  dispatch_preprocess(dtype, params.c_pad, planar, [&](auto dtype_tag, auto pad_tag, auto planar_tag) {
    for (int64_t g = 0; g < groups; ++g) {
      preprocess_group<decltype(dtype_tag)::value, decltype(pad_tag)::value, decltype(planar_tag)::value>(params, g);
    }
  });
}

}  // namespace fastres
