// 3x3 'SAME' stride-1 float32 convolutions on the CPU through oneDNN, as XLA FFI handlers.
//
// XLA's CPU backend computes these thin convolutions several times slower than oneDNN's
// direct kernels, above all the kernel gradient (docs/BENCHMARKS.md). Three handlers, one
// per part of a convolution's work, are registered by poster_cnn/onednn_conv.py and used
// behind a jax.custom_vjp:
//
//   poster_cnn_conv3x3_forward          x (B, H, W, C), w (3, 3, C, K) -> y (B, H, W, K)
//   poster_cnn_conv3x3_backward_data    dy (B, H, W, K), w (3, 3, C, K) -> dx (B, H, W, C)
//   poster_cnn_conv3x3_backward_weights x (B, H, W, C), dy (B, H, W, K) -> dw (3, 3, C, K)
//
// and the same convolution with the layer's bias and ReLU fused in (oneDNN post-op; the
// bias gradient is reduced in the kernel gradient's pass over dy):
//
//   poster_cnn_conv3x3_bias_relu_forward       x, w, bias (K,) -> relu(conv(x, w) + bias)
//   poster_cnn_conv3x3_backward_weights_bias   x, dy -> dw (3, 3, C, K), dbias (K,)
//
// and 2x2 stride-2 max pooling, whose forward records each window's argmax (oneDNN's
// workspace, one byte per output) for the backward:
//
//   poster_cnn_max_pool2x2_forward    x (B, H, W, C) -> y (B, H/2, W/2, C), ws (same, uint8)
//   poster_cnn_max_pool2x2_backward   dy (B, H/2, W/2, C), ws -> dx (B, H, W, C)
//
// Activations stay in XLA's NHWC buffers (oneDNN reads and writes them in place); the kernel
// is reordered between JAX's HWIO and the blocked layout oneDNN prefers, which is cheap (at
// most 3x3x64x128 values). Primitives are created once per shape and cached: creating one
// costs milliseconds, executing it is what is timed.

#include <Python.h>

#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

enum class Part { kForward, kBackwardData, kBackwardWeights, kForwardBiasRelu,
                  kBackwardWeightsBias };

// One convolution shape: batch, height, width, input and output channels.
struct Shape {
  int64_t b, h, w, c, k;
  auto key() const { return std::make_tuple(b, h, w, c, k); }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Everything needed to run one part for one shape; immutable once built, so several
// threads may execute it at once. XLA runs independent custom calls concurrently, so each
// call brings its own memory, scratchpad included: oneDNN's library-managed scratchpad is
// shared between executions and gave wrong results under concurrent calls.
struct Plan {
  dnnl::primitive conv;
  memory::desc x, y, w_user, w_conv;  // activations NHWC; kernel as JAX holds it / as oneDNN wants it
  memory::desc bias;  // (K,), for the parts with a bias
  memory::desc conv_scratch, reorder_scratch;
  dnnl::primitive w_reorder;  // w_user <-> w_conv when they differ (direction depends on the part)
  bool reorder = false;
};

std::unique_ptr<Plan> MakePlan(Part part, const Shape& s) {
  auto& eng = Engine();
  auto plan = std::make_unique<Plan>();
  plan->x = memory::desc({s.b, s.c, s.h, s.w}, memory::data_type::f32, Tag::nhwc);
  plan->y = memory::desc({s.b, s.k, s.h, s.w}, memory::data_type::f32, Tag::nhwc);
  plan->w_user = memory::desc({s.k, s.c, 3, 3}, memory::data_type::f32, Tag::hwio);
  memory::desc w_any({s.k, s.c, 3, 3}, memory::data_type::f32, Tag::any);
  const bool with_bias = part == Part::kForwardBiasRelu || part == Part::kBackwardWeightsBias;
  if (with_bias) plan->bias = memory::desc({s.k}, memory::data_type::f32, Tag::a);
  const memory::dims strides{1, 1}, pad{1, 1};
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // The backward parts are built from the forward's description (oneDNN's hint), so all three
  // agree on the kernel's layout.
  auto fwd = with_bias ? dnnl::convolution_forward::primitive_desc(
                             eng, dnnl::prop_kind::forward_training, algo, plan->x, w_any,
                             plan->bias, plan->y, strides, pad, pad, attr)
                       : dnnl::convolution_forward::primitive_desc(
                             eng, dnnl::prop_kind::forward_training, algo, plan->x, w_any,
                             plan->y, strides, pad, pad, attr);
  switch (part) {
    case Part::kForwardBiasRelu: {
      dnnl::post_ops relu;
      relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
      // A new attribute: copies of a dnnl::primitive_attr share one object, and the kernel's
      // reorder below must not get the post-op.
      dnnl::primitive_attr fused;
      fused.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      fused.set_post_ops(relu);
      fwd = dnnl::convolution_forward::primitive_desc(eng, dnnl::prop_kind::forward_training,
                                                      algo, plan->x, w_any, plan->bias, plan->y,
                                                      strides, pad, pad, fused);
      plan->w_conv = fwd.weights_desc();
      plan->conv_scratch = fwd.scratchpad_desc();
      plan->conv = dnnl::convolution_forward(fwd);
      break;
    }
    case Part::kBackwardWeightsBias: {
      dnnl::convolution_backward_weights::primitive_desc bwd(
          eng, algo, plan->x, w_any, plan->bias, plan->y, strides, pad, pad, fwd, attr);
      plan->w_conv = bwd.diff_weights_desc();
      plan->conv_scratch = bwd.scratchpad_desc();
      plan->conv = dnnl::convolution_backward_weights(bwd);
      break;
    }
    case Part::kForward:
      plan->w_conv = fwd.weights_desc();
      plan->conv_scratch = fwd.scratchpad_desc();
      plan->conv = dnnl::convolution_forward(fwd);
      break;
    case Part::kBackwardData: {
      dnnl::convolution_backward_data::primitive_desc bwd(eng, algo, plan->x, w_any, plan->y,
                                                          strides, pad, pad, fwd, attr);
      plan->w_conv = bwd.weights_desc();
      plan->conv_scratch = bwd.scratchpad_desc();
      plan->conv = dnnl::convolution_backward_data(bwd);
      break;
    }
    case Part::kBackwardWeights: {
      dnnl::convolution_backward_weights::primitive_desc bwd(eng, algo, plan->x, w_any, plan->y,
                                                             strides, pad, pad, fwd, attr);
      plan->w_conv = bwd.diff_weights_desc();
      plan->conv_scratch = bwd.scratchpad_desc();
      plan->conv = dnnl::convolution_backward_weights(bwd);
      break;
    }
  }
  plan->reorder = plan->w_conv != plan->w_user;
  if (plan->reorder) {
    const bool to_user = part == Part::kBackwardWeights || part == Part::kBackwardWeightsBias;
    auto pd = to_user
                  ? dnnl::reorder::primitive_desc(eng, plan->w_conv, eng, plan->w_user, attr)
                  : dnnl::reorder::primitive_desc(eng, plan->w_user, eng, plan->w_conv, attr);
    plan->reorder_scratch = pd.scratchpad_desc();
    plan->w_reorder = dnnl::reorder(pd);
  }
  return plan;
}

const Plan& GetPlan(Part part, const Shape& s) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t>,
                  std::unique_ptr<Plan>>
      plans;
  auto key = std::tuple_cat(std::make_tuple(static_cast<int>(part)), s.key());
  std::lock_guard<std::mutex> lock(mu);
  auto& plan = plans[key];
  if (!plan) plan = MakePlan(part, s);
  return *plan;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// Validates `a` as (B, H, W, C) and `b` as (B, H, W, K), or, for `kernel_second`, `b` as the
// (3, 3, C, K) kernel and then K from it.
ffi::ErrorOr<Shape> ActivationShape(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b,
                                    bool kernel_second) {
  if (a.size() != 4 || b.size() != 4) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("expected rank-4 operands"));
  }
  Shape s{a[0], a[1], a[2], a[3], b[3]};
  if (kernel_second && (b[0] != 3 || b[1] != 3 || b[2] != a[3])) {
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("kernel must be (3, 3, C, K) with C the input's channels"));
  }
  if (!kernel_second && (b[0] != a[0] || b[1] != a[1] || b[2] != a[2])) {
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("input and output gradient must share B, H and W"));
  }
  return s;
}

ffi::Error Run(Part part, const Shape& s, void* x, void* w, void* y, void* bias = nullptr) {
  try {
    const Plan& plan = GetPlan(part, s);
    auto& eng = Engine();
    auto& stream = Stream();
    memory xm(plan.x, eng, x), ym(plan.y, eng, y), wm(plan.w_user, eng, w);
    memory wc = plan.reorder ? memory(plan.w_conv, eng) : wm;
    memory conv_scratch(plan.conv_scratch, eng);
    auto reorder_weights = [&](const memory& from, const memory& to) {
      memory scratch(plan.reorder_scratch, eng);
      plan.w_reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                      {DNNL_ARG_SCRATCHPAD, scratch}});
    };
    const bool kernel_out = part == Part::kBackwardWeights || part == Part::kBackwardWeightsBias;
    if (plan.reorder && !kernel_out) reorder_weights(wm, wc);
    switch (part) {
      case Part::kForwardBiasRelu:
        plan.conv.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wc},
                                   {DNNL_ARG_BIAS, memory(plan.bias, eng, bias)},
                                   {DNNL_ARG_DST, ym}, {DNNL_ARG_SCRATCHPAD, conv_scratch}});
        break;
      case Part::kBackwardWeightsBias:
        plan.conv.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, ym},
                                   {DNNL_ARG_DIFF_WEIGHTS, wc},
                                   {DNNL_ARG_DIFF_BIAS, memory(plan.bias, eng, bias)},
                                   {DNNL_ARG_SCRATCHPAD, conv_scratch}});
        if (plan.reorder) reorder_weights(wc, wm);
        break;
      case Part::kForward:
        plan.conv.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wc},
                                   {DNNL_ARG_DST, ym}, {DNNL_ARG_SCRATCHPAD, conv_scratch}});
        break;
      case Part::kBackwardData:
        plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_WEIGHTS, wc},
                                   {DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_SCRATCHPAD, conv_scratch}});
        break;
      case Part::kBackwardWeights:
        plan.conv.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, ym},
                                   {DNNL_ARG_DIFF_WEIGHTS, wc},
                                   {DNNL_ARG_SCRATCHPAD, conv_scratch}});
        if (plan.reorder) reorder_weights(wc, wm);
        break;
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {  // e.g. std::bad_alloc; never let one unwind into XLA
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 w, F32Out y) {
  auto s = ActivationShape(x.dimensions(), w.dimensions(), /*kernel_second=*/true);
  if (s.has_error()) return s.error();
  return Run(Part::kForward, *s, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BackwardData(F32 dy, F32 w, F32Out dx) {
  auto dims = dx->dimensions();
  auto s = ActivationShape(dims, w.dimensions(), /*kernel_second=*/true);
  if (s.has_error()) return s.error();
  auto dy_dims = dy.dimensions();
  if (dy_dims.size() != 4 || dy_dims[0] != s->b || dy_dims[1] != s->h || dy_dims[2] != s->w ||
      dy_dims[3] != s->k) {
    return ffi::Error::InvalidArgument("output gradient must be (B, H, W, K)");
  }
  return Run(Part::kBackwardData, *s, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error BackwardWeights(F32 x, F32 dy, F32Out dw) {
  auto s = ActivationShape(x.dimensions(), dy.dimensions(), /*kernel_second=*/false);
  if (s.has_error()) return s.error();
  return Run(Part::kBackwardWeights, *s, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

ffi::Error ForwardBiasRelu(F32 x, F32 w, F32 bias, F32Out y) {
  auto s = ActivationShape(x.dimensions(), w.dimensions(), /*kernel_second=*/true);
  if (s.has_error()) return s.error();
  if (bias.dimensions().size() != 1 || bias.dimensions()[0] != s->k) {
    return ffi::Error::InvalidArgument("bias must be (K,)");
  }
  return Run(Part::kForwardBiasRelu, *s, x.untyped_data(), w.untyped_data(), y->untyped_data(),
             bias.untyped_data());
}

ffi::Error BackwardWeightsBias(F32 x, F32 dy, F32Out dw, F32Out dbias) {
  auto s = ActivationShape(x.dimensions(), dy.dimensions(), /*kernel_second=*/false);
  if (s.has_error()) return s.error();
  return Run(Part::kBackwardWeightsBias, *s, x.untyped_data(), dw->untyped_data(),
             dy.untyped_data(), dbias->untyped_data());
}


// ---------------------------------------------------------------- 2x2 max pooling

struct PoolPlan {
  dnnl::primitive pool;
  memory::desc x, y, ws, scratch;
};

// 2x2 windows at stride 2, no padding: an odd last row or column is left out, as 'VALID'
// pooling does, and gets a zero gradient.
std::unique_ptr<PoolPlan> MakePoolPlan(bool backward, int64_t b, int64_t h, int64_t w,
                                       int64_t c) {
  auto& eng = Engine();
  auto plan = std::make_unique<PoolPlan>();
  plan->x = memory::desc({b, c, h, w}, memory::data_type::f32, Tag::nhwc);
  plan->y = memory::desc({b, c, h / 2, w / 2}, memory::data_type::f32, Tag::nhwc);
  const memory::dims two{2, 2}, zero{0, 0};
  const auto algo = dnnl::algorithm::pooling_max;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::pooling_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, algo,
                                            plan->x, plan->y, two, two, zero, zero, zero, attr);
  plan->ws = fwd.workspace_desc();
  if (backward) {
    dnnl::pooling_backward::primitive_desc bwd(eng, algo, plan->x, plan->y, two, two, zero,
                                               zero, zero, fwd, attr);
    plan->scratch = bwd.scratchpad_desc();
    plan->pool = dnnl::pooling_backward(bwd);
  } else {
    plan->scratch = fwd.scratchpad_desc();
    plan->pool = dnnl::pooling_forward(fwd);
  }
  return plan;
}

const PoolPlan& GetPoolPlan(bool backward, int64_t b, int64_t h, int64_t w, int64_t c) {
  static std::mutex mu;
  static std::map<std::tuple<bool, int64_t, int64_t, int64_t, int64_t>,
                  std::unique_ptr<PoolPlan>>
      plans;
  std::lock_guard<std::mutex> lock(mu);
  auto& plan = plans[std::make_tuple(backward, b, h, w, c)];
  if (!plan) plan = MakePoolPlan(backward, b, h, w, c);
  return *plan;
}

ffi::Error RunPool(bool backward, ffi::Span<const int64_t> x_dims, size_t ws_bytes, void* x,
                   void* y, void* ws) {
  if (x_dims.size() != 4 || x_dims[1] < 2 || x_dims[2] < 2) {
    return ffi::Error::InvalidArgument("max pooling needs (B, H, W, C) with H, W >= 2");
  }
  try {
    const PoolPlan& plan = GetPoolPlan(backward, x_dims[0], x_dims[1], x_dims[2], x_dims[3]);
    if (plan.ws.get_size() != ws_bytes) {  // onednn_conv.py sizes it as one byte per output
      return ffi::Error::Internal("oneDNN's pooling workspace is not one byte per output");
    }
    auto& eng = Engine();
    auto& stream = Stream();
    memory xm(plan.x, eng, x), ym(plan.y, eng, y), wsm(plan.ws, eng, ws);
    memory scratch(plan.scratch, eng);
    if (backward) {
      plan.pool.execute(stream, {{DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_WORKSPACE, wsm},
                                 {DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan.pool.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DST, ym},
                                 {DNNL_ARG_WORKSPACE, wsm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN pooling: ") + e.what());
  }
  return ffi::Error::Success();
}

using U8 = ffi::Buffer<ffi::U8>;
using U8Out = ffi::ResultBuffer<ffi::U8>;

ffi::Error PoolForward(F32 x, F32Out y, U8Out ws) {
  return RunPool(false, x.dimensions(), ws->size_bytes(), x.untyped_data(), y->untyped_data(),
                 ws->untyped_data());
}

ffi::Error PoolBackward(F32 dy, U8 ws, F32Out dx) {
  return RunPool(true, dx->dimensions(), ws.size_bytes(), dx->untyped_data(), dy.untyped_data(),
                 ws.untyped_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PosterCnnConv3x3BiasReluForward, ForwardBiasRelu,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PosterCnnConv3x3BackwardWeightsBias, BackwardWeightsBias,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PosterCnnMaxPool2x2Forward, PoolForward,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Ret<ffi::Buffer<ffi::U8>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PosterCnnMaxPool2x2Backward, PoolBackward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<ffi::Buffer<ffi::U8>>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PosterCnnConv3x3Forward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PosterCnnConv3x3BackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PosterCnnConv3x3BackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>());

// A Python module holding each handler as a capsule, for jax.ffi.register_ffi_target.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_onednn_conv3x3",
                                 "oneDNN 3x3 convolution handlers for XLA's FFI.", -1, nullptr};

PyMODINIT_FUNC PyInit__onednn_conv3x3() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifndef POSTER_CNN_BUILT_WITH_JAXLIB  // setup.py defines it
#define POSTER_CNN_BUILT_WITH_JAXLIB "unknown"
#endif
  if (PyModule_AddStringConstant(module, "built_with_jaxlib", POSTER_CNN_BUILT_WITH_JAXLIB) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  const std::pair<const char*, XLA_FFI_Handler*> handlers[] = {
      {"forward", PosterCnnConv3x3Forward},
      {"backward_data", PosterCnnConv3x3BackwardData},
      {"backward_weights", PosterCnnConv3x3BackwardWeights},
      {"bias_relu_forward", PosterCnnConv3x3BiasReluForward},
      {"backward_weights_bias", PosterCnnConv3x3BackwardWeightsBias},
      {"max_pool2x2_forward", PosterCnnMaxPool2x2Forward},
      {"max_pool2x2_backward", PosterCnnMaxPool2x2Backward},
  };
  for (const auto& [name, fn] : handlers) {
    PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(fn), nullptr, nullptr);
    if (capsule == nullptr || PyModule_AddObject(module, name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
