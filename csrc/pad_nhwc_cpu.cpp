// CPU twin of pad_nhwc.cu: the same pad_nhwc_pixel, one output pixel per loop step.
#include "pad_nhwc.h"

namespace fastres {

void pad_nhwc_cpu(const PadNhwcParams& params, int element_size) {
  for (int64_t q = 0; q < params.pixels; ++q) {
    if (element_size == 2) {
      pad_nhwc_pixel<uint16_t>(params, q);
    } else {
      pad_nhwc_pixel<uint32_t>(params, q);
    }
  }
}

}  // namespace fastres
