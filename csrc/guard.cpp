// fastres._guard: the per-forward guard check of a captured plan as one C++ loop.
//
// fastres/guard.py documents what is snapshotted and why; this file only makes the check cheap.
// Unlike fastres._C (plain pybind11 over raw pointers) this module includes PyTorch's headers:
// a tensor's version counter and storage are read straight from its TensorImpl, which is what
// makes checking a few hundred parameters cost about a microsecond instead of tens.
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace {

const void* storage_of(const c10::TensorImpl* impl) {
  return impl->has_storage() ? impl->storage().unsafeGetStorageImpl() : nullptr;
}

// An inference tensor (made under torch.inference_mode) has no version counter: -1. Its in-place
// edits are invisible to a guard, so fastres runs PyTorch's forward for a module holding one
// (capture.inference_weights_reason); the guard still sees it replaced.
int64_t version_of(const c10::TensorImpl* impl) {
  const c10::VariableVersion& counter = impl->version_counter();
  return counter.enabled() ? static_cast<int64_t>(counter.current_version()) : -1;
}

struct TensorState {
  int64_t version;
  const void* storage;
  int64_t offset;
  c10::ScalarType dtype;
  c10::Device device;
  std::vector<int64_t> sizes;

  static TensorState of(const at::Tensor& t) {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    return {version_of(impl), storage_of(impl),
            impl->storage_offset(), t.scalar_type(), t.device(),
            std::vector<int64_t>(impl->sizes().begin(), impl->sizes().end())};
  }

  // No allocation on the per-forward path: compare in place.
  bool matches(const at::Tensor& t) const {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    return version_of(impl) == version &&
           storage_of(impl) == storage && impl->storage_offset() == offset &&
           t.scalar_type() == dtype && t.device() == device && impl->sizes().equals(sizes);
  }
};

// CPython 3.11-3.13 stamp every dict mutation with a new ma_version_tag (PEP 509): one compare
// per dict instead of a walk over its entries. Other versions walk the entries.
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
#define FASTRES_DICT_VERSION_TAG 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
uint64_t dict_version(PyObject* d) { return reinterpret_cast<PyDictObject*>(d)->ma_version_tag; }
#pragma GCC diagnostic pop
#else
#define FASTRES_DICT_VERSION_TAG 0
uint64_t dict_version(PyObject*) { return 0; }
#endif

class Snapshot {
 public:
  Snapshot(py::list dicts, py::list objects, py::list types, py::list tensors) {
    for (py::handle d : dicts) {
      if (!PyDict_Check(d.ptr())) throw py::type_error("fastres._guard: expected dicts");
      dicts_.push_back(py::reinterpret_borrow<py::object>(d));
      versions_.push_back(dict_version(d.ptr()));
      Py_ssize_t pos = 0;
      PyObject *key, *value;
      std::vector<std::pair<PyObject*, PyObject*>> items;
      while (PyDict_Next(d.ptr(), &pos, &key, &value)) {
        Py_INCREF(key);
        Py_INCREF(value);
        items.emplace_back(key, value);
      }
      items_.push_back(std::move(items));
    }
    if (objects.size() != types.size()) throw py::value_error("fastres._guard: objects/types differ in length");
    for (size_t i = 0; i < objects.size(); ++i) {
      objects_.push_back(py::reinterpret_borrow<py::object>(objects[i]));
      types_.push_back(py::reinterpret_borrow<py::object>(types[i]));
    }
    for (py::handle t : tensors) {
      if (!THPVariable_Check(t.ptr())) throw py::type_error("fastres._guard: expected tensors");
      tensors_.push_back(py::reinterpret_borrow<py::object>(t));
      states_.push_back(TensorState::of(THPVariable_Unpack(t.ptr())));
    }
  }

  ~Snapshot() { release_items(); }

  void release_items() {
    for (auto& items : items_)
      for (auto& kv : items) {
        Py_CLEAR(kv.first);
        Py_CLEAR(kv.second);
      }
    items_.clear();
  }

  Snapshot(const Snapshot&) = delete;
  Snapshot& operator=(const Snapshot&) = delete;

  // The snapshot holds the module's own dicts, and the module holds (through its plan cache)
  // the snapshot: a reference cycle the garbage collector must see to free a dropped model.
  int traverse(visitproc visit, void* arg) const {
    for (const auto& o : dicts_) Py_VISIT(o.ptr());
    for (const auto& items : items_)
      for (const auto& kv : items) {
        Py_VISIT(kv.first);
        Py_VISIT(kv.second);
      }
    for (const auto& o : objects_) Py_VISIT(o.ptr());
    for (const auto& o : types_) Py_VISIT(o.ptr());
    for (const auto& o : tensors_) Py_VISIT(o.ptr());
    return 0;
  }

  void clear() {
    cleared_ = true;
    release_items();
    dicts_.clear();
    objects_.clear();
    types_.clear();
    tensors_.clear();
  }

  bool check() const {
    if (cleared_) return false;
    for (size_t i = 0; i < dicts_.size(); ++i) {
      PyObject* d = dicts_[i].ptr();
      if (FASTRES_DICT_VERSION_TAG) {
        if (dict_version(d) != versions_[i]) return false;
        continue;
      }
      const auto& items = items_[i];
      if (PyDict_GET_SIZE(d) != static_cast<Py_ssize_t>(items.size())) return false;
      Py_ssize_t pos = 0;
      PyObject *key, *value;
      size_t j = 0;
      while (PyDict_Next(d, &pos, &key, &value)) {
        if (j >= items.size() || key != items[j].first || value != items[j].second) return false;
        ++j;
      }
    }
    for (size_t i = 0; i < objects_.size(); ++i)
      if (reinterpret_cast<PyObject*>(Py_TYPE(objects_[i].ptr())) != types_[i].ptr()) return false;
    for (size_t i = 0; i < tensors_.size(); ++i)
      if (!states_[i].matches(THPVariable_Unpack(tensors_[i].ptr()))) return false;
    return true;
  }

 private:
  std::vector<py::object> dicts_;
  std::vector<uint64_t> versions_;
  std::vector<std::vector<std::pair<PyObject*, PyObject*>>> items_;
  std::vector<py::object> objects_, types_;
  std::vector<py::object> tensors_;
  std::vector<TensorState> states_;
  bool cleared_ = false;
};

}  // namespace

PYBIND11_MODULE(_guard, m) {
  m.doc() = "fastres: the guard check of a captured plan (see fastres/guard.py)";
  py::class_<Snapshot>(m, "Snapshot", py::custom_type_setup([](PyHeapTypeObject* heap_type) {
                         auto* type = &heap_type->ht_type;
                         type->tp_flags |= Py_TPFLAGS_HAVE_GC;
                         type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
                           Py_VISIT(Py_TYPE(self));
                           if (!py::detail::is_holder_constructed(self)) return 0;
                           return py::cast<const Snapshot&>(py::handle(self)).traverse(visit, arg);
                         };
                         type->tp_clear = [](PyObject* self) {
                           if (py::detail::is_holder_constructed(self))
                             py::cast<Snapshot&>(py::handle(self)).clear();
                           return 0;
                         };
                       }))
      .def(py::init<py::list, py::list, py::list, py::list>())
      .def("check", &Snapshot::check,
           "True while every snapshotted dict entry, class and tensor state is unchanged");
}
