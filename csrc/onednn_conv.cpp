// fastres._onednn: float32 convolutions, and the classifier head's matrix product, as oneDNN
// primitives made once and kept (the CPU backend's program holds one per conv step and one for the
// head), convolutions on dense channels_last tensors.
//
// Why: PyTorch's mkldnn::_convolution_pointwise builds the oneDNN primitive descriptor anew on
// every call before it finds the primitive in oneDNN's cache (tens to a hundred microseconds of
// host work per call, bench/README.md); a kept primitive costs a few microseconds. Same kernels
// (brgconv on AVX-512/AVX2), the same post-ops as the program's PyTorch ops:
//   residual "none": relu?(conv(x) + bias)
//   residual "sum":  relu?(conv(x) + bias + r), written into r (oneDNN's sum post-op, as
//                    _convolution_pointwise_ does)
//   residual "add":  relu?(conv(x) + bias + r) into a new tensor (a binary add post-op, as
//                    _convolution_pointwise.binary does)
// Linear is x @ weight^T + bias (nn.Linear) as a oneDNN matmul whose weights are reordered once into
// the layout it asks for (mkldnn::_linear_pointwise takes them dense and lays them out per call).
// Weights are reordered once into the layout the primitive asks for; an input shape other than the
// one a layer was made for (another batch; an image size that depends on the batch) gets a
// primitive of its own on first use (a few kept, its weights shared when its layout is the same).
// oneDNN here is the libdnnl linked in (built with GNU OpenMP): it runs on PyTorch's libgomp,
// loaded first, so torch.set_num_threads and omp_set_num_threads apply.
#include <torch/extension.h>

#include <oneapi/dnnl/dnnl.hpp>

#if DNNL_CPU_THREADING_RUNTIME != DNNL_RUNTIME_OMP
#error "fastres._onednn needs oneDNN built with OpenMP (onednn-cpu-gomp): PyTorch's libgomp runs its threads"
#endif

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using dnnl::memory;
using Dims = memory::dims;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum class Residual { none, sum, add };

Residual parse_residual(const std::string& mode) {
  if (mode == "none") return Residual::none;
  if (mode == "sum") return Residual::sum;
  if (mode == "add") return Residual::add;
  TORCH_CHECK(false, "fastres._onednn.Conv: residual must be 'none', 'sum' or 'add', not '", mode, "'");
}

bool dense_channels_last(const torch::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_neg() && !t.is_conj();
}

// An input shape's primitive and the weights in its layout.
struct Kept {
  dnnl::primitive primitive;
  memory::desc src, dst, weights_desc;
  memory weights;
  std::vector<int64_t> out_shape;
  size_t scratchpad_bytes = 0;
  std::string impl;
  uint64_t last_use = 0;
};

// Primitives kept for input shapes other than the one a layer was made for (other batches; an
// image size that depends on the batch), least recently used dropped first.
constexpr size_t kOtherShapesKept = 16;

// One layer's primitives: the one for the input shape it was made for, whose weights are the user's
// reordered once, and those made on first use for other shapes (their weights reordered from the
// first's, or shared with them when the layout is the same). A subclass says how a shape's primitive
// is made (make) and how the user's weights are laid out.
class KeptLayer {
 public:
  virtual ~KeptLayer() = default;

  std::string impl() const { return first_->impl; }

  // bytes of the weights this layer keeps now (its first layout and the other shapes' own)
  int64_t weight_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t bytes = first_->weights.get_desc().get_size();
    for (const auto& entry : others_) {
      const memory& weights = entry.second->weights;
      if (weights.get_data_handle() != first_->weights.get_data_handle()) bytes += weights.get_desc().get_size();
    }
    return static_cast<int64_t>(bytes);
  }

  int64_t shapes_kept() {
    std::lock_guard<std::mutex> lock(mutex_);
    return 1 + static_cast<int64_t>(others_.size());
  }

  // Drops the primitives made for other shapes (and their own weights): a check that ran the layer
  // on shapes a program will not run leaves nothing behind. Callers still running hold theirs.
  void forget_other_shapes() {
    std::lock_guard<std::mutex> lock(mutex_);
    others_.clear();
  }

 protected:
  explicit KeptLayer(std::string name) : name_(std::move(name)) {}

  virtual Kept make(const std::vector<int64_t>& shape) const = 0;

  // The primitive for `shape` (the first), the user's weights (`user`, over their memory) reordered
  // into its layout. Called by the subclass's constructor, once its geometry is set.
  void keep_first(const std::vector<int64_t>& shape, const memory::desc& user, void* user_data) {
    try {
      auto first = std::make_shared<Kept>(make(shape));
      memory from(user, cpu_engine(), user_data);
      first->weights = memory(first->weights_desc, cpu_engine());
      dnnl::stream stream(cpu_engine());
      dnnl::reorder(from, first->weights).execute(stream, from, first->weights);
      stream.wait();
      shape_ = shape;
      first_ = first;
    } catch (const dnnl::error& err) {
      TORCH_CHECK(false, name_, ": oneDNN refused this ", kind(), ": ", err.what());
    }
  }

  std::shared_ptr<const Kept> for_shape(const std::vector<int64_t>& shape) {
    if (shape == shape_) return first_;
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = others_.find(shape);
    if (found != others_.end()) {
      std::const_pointer_cast<Kept>(found->second)->last_use = ++uses_;
      return found->second;
    }
    if (others_.size() >= kOtherShapesKept) {  // callers still running hold theirs
      auto oldest = others_.begin();
      for (auto it = others_.begin(); it != others_.end(); ++it) {
        if (it->second->last_use < oldest->second->last_use) oldest = it;
      }
      others_.erase(oldest);
    }
    try {
      auto kept = std::make_shared<Kept>(make(shape));
      if (kept->weights_desc == first_->weights_desc) {
        kept->weights = first_->weights;  // the same layout: shared
      } else {
        kept->weights = memory(kept->weights_desc, cpu_engine());
        memory from = first_->weights;  // (a handle: the copy shares the buffer)
        dnnl::stream stream(cpu_engine());
        dnnl::reorder(from, kept->weights).execute(stream, from, kept->weights);
        stream.wait();
      }
      kept->last_use = ++uses_;
      others_.emplace(shape, kept);
      return kept;
    } catch (const dnnl::error& err) {
      TORCH_CHECK(false, name_, ": oneDNN refused input ", c10::IntArrayRef(shape), ": ", err.what());
    }
  }

  // One argument of a primitive: its oneDNN name, layout and memory.
  struct Arg {
    int name;
    memory::desc desc;
    void* data;
  };

  // Runs `kept` on `args` (its source, destination and the subclass's own) with its weights, the
  // bias when there is one and a scratchpad of this call's own (PyTorch's allocator): calls from
  // several threads never share one.
  void execute(const Kept& kept, const std::vector<Arg>& user_args, const torch::Tensor& bias,
               const memory::desc& bias_desc) const {
    torch::Tensor scratchpad = torch::empty({static_cast<int64_t>(kept.scratchpad_bytes)},
                                            torch::TensorOptions().dtype(torch::kUInt8));
    try {
      auto& engine = cpu_engine();
      std::unordered_map<int, memory> args;
      for (const Arg& arg : user_args) args.emplace(arg.name, memory(arg.desc, engine, arg.data));
      args.emplace(DNNL_ARG_WEIGHTS, kept.weights);
      if (kept.scratchpad_bytes > 0) {
        args.emplace(DNNL_ARG_SCRATCHPAD,
                     memory(memory::desc({static_cast<int64_t>(kept.scratchpad_bytes)}, memory::data_type::u8,
                                         memory::format_tag::x),
                            engine, scratchpad.data_ptr()));
      }
      if (bias.defined()) args.emplace(DNNL_ARG_BIAS, memory(bias_desc, engine, bias.data_ptr()));
      dnnl::stream stream(engine);
      kept.primitive.execute(stream, args);
      stream.wait();
    } catch (const dnnl::error& err) {
      TORCH_CHECK(false, name_, ": oneDNN failed to run: ", err.what());
    }
  }

  virtual const char* kind() const = 0;

  // A copy of the bias (`entries` float32 values on the CPU), or an undefined tensor for none.
  torch::Tensor own_bias(const c10::optional<torch::Tensor>& bias, int64_t entries) const {
    if (!bias.has_value()) return torch::Tensor();
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == entries && bias->scalar_type() == torch::kFloat &&
                    bias->device().is_cpu(),
                name_, ": bias must be a float32 CPU tensor of ", entries, " entries, got ", bias->scalar_type(), " ",
                bias->sizes(), " on ", bias->device());
    return bias->resolve_conj().resolve_neg().contiguous().clone();
  }

  std::string name_;  // for messages: "fastres._onednn.Conv"

 private:
  std::vector<int64_t> shape_;
  std::shared_ptr<const Kept> first_;
  std::mutex mutex_;
  uint64_t uses_ = 0;
  std::map<std::vector<int64_t>, std::shared_ptr<const Kept>> others_;
};

class Conv final : public KeptLayer {
 public:
  Conv(const std::vector<int64_t>& input_shape, const torch::Tensor& weight,
       const c10::optional<torch::Tensor>& bias, const std::vector<int64_t>& stride,
       const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
       const std::string& residual, bool relu)
      : KeptLayer("fastres._onednn.Conv"), residual_(parse_residual(residual)), relu_(relu) {
    TORCH_CHECK(input_shape.size() == 4 && input_shape[0] > 0 && input_shape[1] > 0 && input_shape[2] > 0 &&
                    input_shape[3] > 0,
                "fastres._onednn.Conv: input shape must be [N, C, H, W] with positive sizes");
    TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == torch::kFloat && weight.device().is_cpu(),
                "fastres._onednn.Conv: weight must be a 4-D float32 CPU tensor, got ", weight.scalar_type(), " ",
                weight.sizes(), " on ", weight.device());
    TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                "fastres._onednn.Conv: stride, padding and dilation must have 2 entries");
    TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                    padding[1] >= 0 && groups >= 1,
                "fastres._onednn.Conv: stride and dilation must be >= 1, padding >= 0 and groups >= 1, got stride ",
                stride, ", padding ", padding, ", dilation ", dilation, ", groups ", groups);
    c_ = input_shape[1];
    o_ = weight.size(0);
    kh_ = weight.size(2);
    kw_ = weight.size(3);
    TORCH_CHECK(o_ % groups == 0 && weight.size(1) * groups == c_,
                "fastres._onednn.Conv: weight ", weight.sizes(), " does not fit ", c_, " input channels in ",
                groups, " groups");
    stride_ = Dims(stride.begin(), stride.end());
    padding_ = Dims(padding.begin(), padding.end());
    dilation_ = {dilation[0] - 1, dilation[1] - 1};  // oneDNN counts the gaps
    weight_dims_ = groups == 1 ? Dims{o_, c_, kh_, kw_} : Dims{groups, o_ / groups, c_ / groups, kh_, kw_};
    bias_ = own_bias(bias, o_);
    // the user's OIHW weights
    torch::Tensor dense = weight.resolve_conj().resolve_neg().contiguous();
    auto tag = groups == 1 ? memory::format_tag::oihw : memory::format_tag::goihw;
    keep_first({input_shape[0], c_, input_shape[2], input_shape[3]},
               memory::desc(weight_dims_, memory::data_type::f32, tag), dense.data_ptr());
  }

  torch::Tensor run(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 4,
                "fastres._onednn.Conv: input must be a 4-D float32 CPU tensor, got ", x.scalar_type(), " ",
                x.sizes(), " on ", x.device());
    TORCH_CHECK(x.size(1) == c_, "fastres._onednn.Conv: input ", x.sizes(), " has ", x.size(1), " channels, not ",
                c_);
    TORCH_CHECK(dense_channels_last(x), "fastres._onednn.Conv: input must be dense channels_last, got sizes ",
                x.sizes(), " strides ", x.strides());
    TORCH_CHECK(x.numel() > 0, "fastres._onednn.Conv: empty input ", x.sizes());
    std::shared_ptr<const Kept> kept = for_shape(x.sizes().vec());
    const auto& out_shape = kept->out_shape;
    torch::Tensor r;
    if (residual_ != Residual::none) {
      TORCH_CHECK(residual.has_value(), "fastres._onednn.Conv: this conv adds a residual; none was given");
      r = *residual;
      TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == torch::kFloat && r.sizes() == c10::IntArrayRef(out_shape)
                      && dense_channels_last(r),
                  "fastres._onednn.Conv: the residual must be a dense channels_last float32 CPU tensor of the "
                  "output's sizes ", c10::IntArrayRef(out_shape), ", got ", r.scalar_type(), " sizes ", r.sizes(),
                  " strides ", r.strides(), " on ", r.device());
      if (residual_ == Residual::sum) {
        // the sum is written into the residual while the input is read: they must not share memory
        TORCH_CHECK(at::get_overlap_status(r, x) == at::MemOverlapStatus::No,
                    "fastres._onednn.Conv: the residual written in place shares memory with the input");
      }
    }
    torch::Tensor y = residual_ == Residual::sum
                          ? r
                          : torch::empty(out_shape, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    std::vector<Arg> args{{DNNL_ARG_SRC, kept->src, x.data_ptr()}, {DNNL_ARG_DST, kept->dst, y.data_ptr()}};
    if (residual_ == Residual::add) {
      args.push_back({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, kept->dst, r.data_ptr()});
    }
    execute(*kept, args, bias_, memory::desc({o_}, memory::data_type::f32, memory::format_tag::x));
    return y;
  }

 private:
  const char* kind() const override { return "convolution"; }

  Kept make(const std::vector<int64_t>& shape) const override {
    int64_t oh = (shape[2] + 2 * padding_[0] - (dilation_[0] + 1) * (kh_ - 1) - 1) / stride_[0] + 1;
    int64_t ow = (shape[3] + 2 * padding_[1] - (dilation_[1] + 1) * (kw_ - 1) - 1) / stride_[1] + 1;
    TORCH_CHECK(oh > 0 && ow > 0, "fastres._onednn.Conv: input ", c10::IntArrayRef(shape),
                " is smaller than the (dilated) kernel ", kh_, "x", kw_, " with padding ", padding_,
                ": empty output");
    Kept kept;
    kept.out_shape = {shape[0], o_, oh, ow};
    kept.src = memory::desc(shape, memory::data_type::f32, memory::format_tag::nhwc);
    kept.dst = memory::desc(kept.out_shape, memory::data_type::f32, memory::format_tag::nhwc);
    dnnl::post_ops post_ops;
    if (residual_ == Residual::sum) post_ops.append_sum(1.f);
    if (residual_ == Residual::add) post_ops.append_binary(dnnl::algorithm::binary_add, kept.dst);
    if (relu_) post_ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(post_ops);
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto weights_any = memory::desc(weight_dims_, memory::data_type::f32, memory::format_tag::any);
    auto bias_md = bias_.defined() ? memory::desc({o_}, memory::data_type::f32, memory::format_tag::x) : memory::desc();
    dnnl::convolution_forward::primitive_desc pd(cpu_engine(), dnnl::prop_kind::forward_inference,
                                                 dnnl::algorithm::convolution_direct, kept.src, weights_any, bias_md,
                                                 kept.dst, stride_, dilation_, padding_, padding_, attr);
    kept.weights_desc = pd.weights_desc();
    kept.scratchpad_bytes = pd.scratchpad_desc().get_size();
    kept.impl = pd.impl_info_str();
    kept.primitive = dnnl::convolution_forward(pd);
    return kept;
  }

  Residual residual_;
  bool relu_;
  int64_t c_ = 0, o_ = 0, kh_ = 0, kw_ = 0;
  Dims stride_, padding_, dilation_, weight_dims_;
  torch::Tensor bias_;
};

// y = x @ weight^T + bias for x [M, K] and weight [N, K] (nn.Linear's), row-major float32.
class Linear final : public KeptLayer {
 public:
  Linear(int64_t rows, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias)
      : KeptLayer("fastres._onednn.Linear") {
    TORCH_CHECK(rows > 0, "fastres._onednn.Linear: rows must be positive, got ", rows);
    TORCH_CHECK(weight.dim() == 2 && weight.numel() > 0 && weight.scalar_type() == torch::kFloat &&
                    weight.device().is_cpu(),
                "fastres._onednn.Linear: weight must be a non-empty 2-D float32 CPU tensor, got ",
                weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
    n_ = weight.size(0);
    k_ = weight.size(1);
    bias_ = own_bias(bias, n_);
    // the user's [N, K] rows are the [K, N] weights of the matmul, column-major ("ba")
    torch::Tensor dense = weight.resolve_conj().resolve_neg().contiguous();
    keep_first({rows, k_}, memory::desc({k_, n_}, memory::data_type::f32, memory::format_tag::ba), dense.data_ptr());
  }

  torch::Tensor run(const torch::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2,
                "fastres._onednn.Linear: input must be a 2-D float32 CPU tensor, got ", x.scalar_type(), " ",
                x.sizes(), " on ", x.device());
    TORCH_CHECK(x.size(1) == k_, "fastres._onednn.Linear: input ", x.sizes(), " has ", x.size(1),
                " features, not ", k_);
    TORCH_CHECK(x.size(0) > 0, "fastres._onednn.Linear: empty input ", x.sizes());
    TORCH_CHECK(x.is_contiguous() && !x.is_neg() && !x.is_conj(),
                "fastres._onednn.Linear: input must be contiguous (and not a negated or conjugated view), got sizes ",
                x.sizes(), " strides ", x.strides());
    std::shared_ptr<const Kept> kept = for_shape(x.sizes().vec());
    torch::Tensor y = torch::empty(kept->out_shape, x.options());
    execute(*kept, {{DNNL_ARG_SRC, kept->src, x.data_ptr()}, {DNNL_ARG_DST, kept->dst, y.data_ptr()}}, bias_,
            bias_desc());
    return y;
  }

 private:
  const char* kind() const override { return "matrix product"; }

  memory::desc bias_desc() const { return memory::desc({1, n_}, memory::data_type::f32, memory::format_tag::ab); }

  Kept make(const std::vector<int64_t>& shape) const override {
    Kept kept;
    kept.out_shape = {shape[0], n_};
    kept.src = memory::desc({shape[0], k_}, memory::data_type::f32, memory::format_tag::ab);
    kept.dst = memory::desc({shape[0], n_}, memory::data_type::f32, memory::format_tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto weights_any = memory::desc({k_, n_}, memory::data_type::f32, memory::format_tag::any);
    dnnl::matmul::primitive_desc pd(cpu_engine(), kept.src, weights_any,
                                    bias_.defined() ? bias_desc() : memory::desc(), kept.dst, attr);
    kept.weights_desc = pd.weights_desc();
    kept.scratchpad_bytes = pd.scratchpad_desc().get_size();
    kept.impl = pd.impl_info_str();
    kept.primitive = dnnl::matmul(pd);
    return kept;
  }

  int64_t n_ = 0, k_ = 0;
  torch::Tensor bias_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "oneDNN float32 convolutions and matrix products kept as primitives; used by fastres's CPU backend.";
  module.attr("onednn_version") = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
  }();
  pybind11::class_<Conv>(module, "Conv")
      .def(pybind11::init<const std::vector<int64_t>&, const torch::Tensor&, const c10::optional<torch::Tensor>&,
                          const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
                          int64_t, const std::string&, bool>(),
           pybind11::arg("input_shape"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("stride"),
           pybind11::arg("padding"), pybind11::arg("dilation"), pybind11::arg("groups"),
           pybind11::arg("residual") = "none", pybind11::arg("relu") = false)
      // without the GIL, as PyTorch's own ops run: other Python threads keep going
      .def("__call__", &Conv::run, pybind11::arg("x"), pybind11::arg("residual") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("impl", &Conv::impl)
      .def_property_readonly("weight_bytes", &Conv::weight_bytes)
      .def_property_readonly("shapes_kept", &Conv::shapes_kept);
  pybind11::class_<Linear>(module, "Linear")
      .def(pybind11::init<int64_t, const torch::Tensor&, const c10::optional<torch::Tensor>&>(),
           pybind11::arg("rows"), pybind11::arg("weight"), pybind11::arg("bias"))
      .def("__call__", &Linear::run, pybind11::arg("x"), pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("impl", &Linear::impl)
      .def_property_readonly("weight_bytes", &Linear::weight_bytes)
      .def_property_readonly("shapes_kept", &Linear::shapes_kept)
      .def("forget_other_shapes", &Linear::forget_other_shapes);
}
