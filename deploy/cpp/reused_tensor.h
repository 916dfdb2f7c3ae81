// A per-thread tensor handed from one call to the next (the Predictor's input tensors, the
// operator's first-layer output): no allocation per call in steady state. glibc's malloc,
// free and consolidation of three to four tensors a call were a fifth of a batch-1 call.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace rocketrec {

// `cached` (a thread_local slot of the caller's) resized in place to `sizes` when nothing
// else holds it any more: the slot alone references its tensor and its storage (a caller
// that kept the last result, or a view of it, has it written over never), the storage is
// large enough, and it is an inference tensor exactly when InferenceMode is on. Else a new
// tensor with room to grow replaces it in the slot.
inline at::Tensor reused_tensor(at::Tensor& cached, at::IntArrayRef sizes, at::ScalarType type) {
  int64_t n = 1;
  for (int64_t x : sizes) n *= x;
  const size_t bytes = static_cast<size_t>(n) * c10::elementSize(type);
  const bool free = cached.defined() && cached.use_count() == 1 && cached.storage().use_count() == 1 &&
                    cached.storage().nbytes() >= bytes && cached.scalar_type() == type &&
                    cached.is_inference() == c10::InferenceMode::is_enabled();
  if (!free) cached = at::empty({std::max<int64_t>(2 * n, 256)}, at::TensorOptions().dtype(type));
  cached.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return cached;
}

}  // namespace rocketrec
