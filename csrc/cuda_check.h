// Error handling for the .cu launchers: a failed launch becomes a C++ exception (RuntimeError in Python).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastres {

inline void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("fastres._C: launching ") + kernel + " failed: " + cudaGetErrorString(status));
  }
}

}  // namespace fastres
