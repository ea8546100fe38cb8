// Saved layouts already checked.  A perturbation's saved runs depend on the values of the offsets
// and of the mask, which an optimizer keeps from step to step; checking them costs a pass over the
// mask (on a GPU two launches, or a sync).  A layout whose tensors have not changed since it passed
// is not checked again.  Not changed: the same tensors (held by weak reference, so that no other
// tensor can take their place while they are remembered), at the same version (PyTorch counts every
// in-place change), over the same data, for a parameter list of the same sizes and dtypes and a
// `saved` of the same size.  With a status its tensor and version belong to the key too: a bad
// layout has set that status, which nothing of ours clears, so a check skipped for it skips no write
// that would have been refused.  (fsam_kernels/_contract.py's CheckedLayouts is the same for the
// Python backends.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <list>
#include <mutex>
#include <optional>
#include <vector>

namespace fsam {

class CheckedLayouts {
 public:
  // Whether the layout of these arguments passed its check and is unchanged since.
  bool contains(at::TensorList params, const std::optional<at::Tensor>& mask_bits, const at::Tensor& save_offsets,
                const at::Tensor& saved, const std::optional<at::Tensor>& status) {
    const std::vector<int64_t> shape = signature(params, saved);
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->shape == shape && it->offsets.matches(save_offsets) && it->mask.matches(mask_bits) &&
          it->status.matches(status)) {
        kept_.splice(kept_.begin(), kept_, it);
        return true;
      }
    }
    return false;
  }

  // Remembers a layout that passed (nothing for inference tensors, which keep no version).
  void add(at::TensorList params, const std::optional<at::Tensor>& mask_bits, const at::Tensor& save_offsets,
           const at::Tensor& saved, const std::optional<at::Tensor>& status) {
    for (const auto* t : {&mask_bits, &status})
      if (t->has_value() && (*t)->is_inference()) return;
    if (save_offsets.is_inference()) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    kept_.push_front({signature(params, saved), Ref(save_offsets), Ref(mask_bits), Ref(status)});
    if (kept_.size() > kKept) kept_.pop_back();
  }

 private:
  static constexpr size_t kKept = 16;

  struct Ref {  // a tensor as it was (or none)
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl{
        c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    int64_t version = -1;
    const void* data = nullptr;
    Ref() = default;
    explicit Ref(const at::Tensor& t) : impl(t.getIntrusivePtr()), version(t._version()), data(t.data_ptr()) {}
    explicit Ref(const std::optional<at::Tensor>& t) : Ref(t.has_value() ? Ref(*t) : Ref()) {}
    bool matches(const at::Tensor& t) const {
      return version >= 0 && !impl.expired() && impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
             !t.is_inference() && t._version() == version && t.data_ptr() == data;
    }
    bool matches(const std::optional<at::Tensor>& t) const { return t.has_value() ? matches(*t) : version < 0; }
  };
  struct Entry {
    std::vector<int64_t> shape;
    Ref offsets, mask, status;
  };

  // Each parameter's elements and element size, then saved's bytes and address.
  static std::vector<int64_t> signature(at::TensorList params, const at::Tensor& saved) {
    std::vector<int64_t> s;
    for (const auto& p : params) {
      s.push_back(p.numel());
      s.push_back(p.element_size());
    }
    s.push_back(saved.numel());
    s.push_back(reinterpret_cast<int64_t>(saved.data_ptr()));
    return s;
  }

  std::mutex mutex_;
  std::list<Entry> kept_;  // the most recently used first
};

// The process's checked layouts (never destroyed: a CUDA tensor's weak reference may outlive CUDA).
inline CheckedLayouts& checked_layouts() {
  static auto* layouts = new CheckedLayouts;
  return *layouts;
}

}  // namespace fsam
