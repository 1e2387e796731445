// The "cpp" recurrence backend: h_t = phi(x_t + h_{t-1} W^T) as one compiled loop over time.
//
// Built at first use by matrec/ops/rnn_recurrence/cpp.py (torch.utils.cpp_extension.load) and
// registered as torch.ops.matrec_cpu.*. Per step the loop does one GEMM and one elementwise pass
// into preallocated [T, B, H] buffers, with no framework op in between: the per-step cost of the
// Python loops ("torch" backend) and of nn.RNN's kernel is dispatch overhead, not arithmetic.
//
// GEMMs go straight to the Fortran BLAS symbols (sgemm_/dgemm_) that torch's own library exports
// when it is built with MKL or OpenBLAS; they are declared weak, so where torch links no such BLAS
// the loop calls at::addmm_out on views instead (slower by the dispatcher's few microseconds per
// call, same results). gemm_path() says which one this build uses.
//
// Everything is row-major [.., H]. A row-major [R, C] matrix is, to column-major BLAS, its
// transpose [C, R] with leading dimension C; the calls below are written in that view.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <tuple>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace {

// The nonlinearity codes; cpp.py holds the same table (_CODES).
enum Phi : int64_t { kTanh = 0, kRelu = 1, kModrelu = 2, kIdentity = 3 };

bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// c [R, M] += a [R, K] @ (trans_w ? W^T : W), all row-major; W is [M, K] (trans_w) or [K, M].
// `w_tensor` is W as a tensor, for the ATen path only.
template <typename scalar_t>
void gemm_acc(const scalar_t* a, const scalar_t* w, scalar_t* c, int64_t R, int64_t M, int64_t K, bool trans_w,
              const at::Tensor& w_tensor) {
  if (have_blas()) {
    // column-major view: c^T [M, R] += op(W_cm) a^T with W_cm = W^T, so op = T gives W, N gives W^T
    const char ta = trans_w ? 'T' : 'N', tb = 'N';
    const int m = static_cast<int>(M), n = static_cast<int>(R), k = static_cast<int>(K);
    const int lda = trans_w ? k : m;
    const scalar_t one = 1;
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgemm_(&ta, &tb, &m, &n, &k, &one, w, &lda, a, &k, &one, c, &m);
    } else {
      dgemm_(&ta, &tb, &m, &n, &k, &one, w, &lda, a, &k, &one, c, &m);
    }
    return;
  }
  auto opts = w_tensor.options();
  auto A = at::from_blob(const_cast<scalar_t*>(a), {R, K}, opts);
  auto C = at::from_blob(c, {R, M}, opts);
  at::addmm_out(C, C, A, trans_w ? w_tensor.t() : w_tensor);
}

// h = phi(z) in place over n elements; b [H] repeats every H elements (modReLU).
// tanh in float32, written so the compiler vectorises the loop (a libm tanhf per element costs
// about as much as the step's GEMM, and ATen's vectorised tanh a dispatch per step). Odd Taylor
// polynomial for |x| < 0.3 (next term ~2e-9 relative), (1 - e) / (1 + e) with e = exp(-2|x|)
// above (1 - e >= 0.45: no cancellation), exp by k ln2 + r, |r| <= ln2/2, and a degree-7
// polynomial in r (~5e-9 relative), 1 from |x| >= 9 (where tanh rounds to 1 in float32).
// Tested against torch.tanh to a few ulps (tests/ops/test_recurrence_cpp.py).
inline float tanh_f32(float x) {
  const float a = std::fabs(x);
  const float x2 = a * a;
  const float small = a * (1.f + x2 * (-1.f / 3 + x2 * (2.f / 15 + x2 * (-17.f / 315 + x2 * (62.f / 2835 +
                      x2 * (-1382.f / 155925))))));
  const float y = -2.f * (a >= 9.f ? 9.f : a);  // NaN stays NaN, through `big`
  // round(y / ln 2) by the 1.5 * 2^23 trick (no libm call, so the loop vectorises without SSE4.1)
  const float k = (y * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (y - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;  // ln 2 = hi + lo
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                  r * (1.f / 720 + r * (1.f / 5040)))))));
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-26, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  const float big = (1.f - e) / (1.f + e);
  const float t = a < 0.3f ? small : (a >= 9.f ? 1.f : big);
  return std::copysign(t, x);
}

// h = phi(z) in place over n elements; b [H] repeats every H elements (modReLU).
template <typename scalar_t>
void phi_inplace(scalar_t* z, int64_t n, int64_t H, const scalar_t* b, int64_t code) {
  switch (code) {
    case kTanh:
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (int64_t i = 0; i < n; ++i) z[i] = tanh_f32(z[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) z[i] = std::tanh(z[i]);
      }
      break;
    case kRelu:
      for (int64_t i = 0; i < n; ++i) z[i] = z[i] > 0 ? z[i] : scalar_t(0);
      break;
    case kModrelu:
      for (int64_t r = 0; r < n; r += H) {
        scalar_t* zr = z + r;
        for (int64_t j = 0; j < H; ++j) {
          // sign(v) * relu(|v| + b), sign(0) = 0 as torch.sign; branch-free so it vectorises
          const scalar_t v = zr[j];
          const scalar_t m = std::abs(v) + b[j];
          const scalar_t s = scalar_t(v > 0) - scalar_t(v < 0);
          zr[j] = s * (m > 0 ? m : scalar_t(0));
        }
      }
      break;
    default:  // identity
      break;
  }
}

// g *= phi'(z) over n elements, with phi' read from h = phi(z) alone (no saved z):
// tanh 1 - h^2; relu [h > 0]; modReLU [h != 0] (h != 0 exactly when z != 0 and |z| + b > 0,
// where the slope is sign(z)^2 = 1; torch's convention gives 0 at z = 0); identity 1.
// For modReLU it also adds the step's dL/db = sum over rows of dL/dz * sign(z) into db [H] (double:
// T * B terms), with sign(z) = sign(h) wherever dL/dz can be nonzero.
template <typename scalar_t>
void times_slope(scalar_t* g, const scalar_t* h, int64_t n, int64_t H, int64_t code, double* db) {
  switch (code) {
    case kTanh:
      for (int64_t i = 0; i < n; ++i) g[i] *= scalar_t(1) - h[i] * h[i];
      break;
    case kRelu:
      for (int64_t i = 0; i < n; ++i) g[i] = h[i] > 0 ? g[i] : scalar_t(0);
      break;
    case kModrelu:
      for (int64_t r = 0; r < n; r += H) {
        scalar_t* gr = g + r;
        const scalar_t* hr = h + r;
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t v = hr[j] != 0 ? gr[j] : scalar_t(0);
          gr[j] = v;
          db[j] += static_cast<double>(v * (scalar_t(hr[j] > 0) - scalar_t(hr[j] < 0)));
        }
      }
      break;
    default:
      break;
  }
}

// The forward loop in place: o [T, B, H] holds x_t on entry and h_t on exit; h0 [B, H] or null.
template <typename scalar_t>
void run_loop(scalar_t* o, const scalar_t* W, const scalar_t* h0, const scalar_t* b, int64_t T, int64_t B,
              int64_t H, int64_t code, const at::Tensor& w) {
  const int64_t n = B * H;
  const scalar_t* prev = h0;  // h_{-1} = 0 when absent
  for (int64_t t = 0; t < T; ++t) {
    scalar_t* z = o + t * n;
    if (prev != nullptr) gemm_acc<scalar_t>(prev, W, z, B, H, H, /*trans_w=*/true, w);
    phi_inplace<scalar_t>(z, n, H, b, code);
    prev = z;
  }
}

void check(const at::Tensor& x, const at::Tensor& w, int64_t code) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(),
              "matrec_cpu: x must be a contiguous CPU tensor [T, B, H]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "matrec_cpu: float32 or float64 only, got ", x.scalar_type());
  const int64_t H = x.size(2);
  TORCH_CHECK(w.sizes() == at::IntArrayRef({H, H}) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "matrec_cpu: weight must be contiguous [H, H] of x's dtype");
  TORCH_CHECK(code >= kTanh && code <= kIdentity, "matrec_cpu: unknown nonlinearity code ", code);
  // BLAS takes 32-bit sizes
  TORCH_CHECK(x.size(1) * H < (int64_t(1) << 31), "matrec_cpu: B * H must be below 2^31");
}

// out [T, B, H] = all states h_1..h_T.
at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& h0,
                   const c10::optional<at::Tensor>& b, int64_t code) {
  check(x, w, code);
  const int64_t H = x.size(2);
  if (h0.has_value()) {
    TORCH_CHECK(h0->sizes() == at::IntArrayRef({x.size(1), H}) && h0->is_contiguous() &&
                h0->scalar_type() == x.scalar_type(), "matrec_cpu: h0 must be contiguous [B, H] of x's dtype");
  }
  TORCH_CHECK((code == kModrelu) == b.has_value(), "matrec_cpu: bias is given exactly for modReLU");
  if (b.has_value()) {
    TORCH_CHECK(b->sizes() == at::IntArrayRef({H}) && b->is_contiguous() && b->scalar_type() == x.scalar_type(),
                "matrec_cpu: bias must be contiguous [H] of x's dtype");
  }
  const int64_t T = x.size(0), B = x.size(1), n = B * H;
  at::Tensor out = x.clone();  // z_t = x_t, then += h_{t-1} W^T and phi in place
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "matrec_cpu_forward", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    const scalar_t* bb = b.has_value() ? b->data_ptr<scalar_t>() : nullptr;
    const scalar_t* prev = h0.has_value() ? h0->data_ptr<scalar_t>() : nullptr;  // h_{-1} = 0 when absent
    run_loop<scalar_t>(o, W, prev, bb, T, B, H, code, w);
  });
  return out;
}

// Inference through stacked one-direction layers, no autograd: x [T, B, I], hx [L, B, H], per
// layer w_ih [H, I or H], w_hh [H, H], optional b_ih, b_hh [H] and modReLU bias [H]. Each layer's
// input projection is one GEMM into the output buffer (pre-filled with b_ih + b_hh), then the
// loop runs in place. Returns (output [T, B, H], h_n [L, B, H]). One call per forward, so a
// decoding step (T = 1) costs a handful of small GEMMs and no framework op per layer.
std::tuple<at::Tensor, at::Tensor> layers_forward(const at::Tensor& x, const at::Tensor& hx,
                                                  at::TensorList w_ih, at::TensorList w_hh,
                                                  const c10::List<c10::optional<at::Tensor>>& b_ih,
                                                  const c10::List<c10::optional<at::Tensor>>& b_hh,
                                                  const c10::List<c10::optional<at::Tensor>>& phi_b, int64_t code) {
  const int64_t L = static_cast<int64_t>(w_ih.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(w_hh.size()) == L && static_cast<int64_t>(b_ih.size()) == L &&
              static_cast<int64_t>(b_hh.size()) == L && static_cast<int64_t>(phi_b.size()) == L,
              "matrec_cpu: one w_ih, w_hh, b_ih, b_hh, phi bias per layer");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "matrec_cpu: x must be a contiguous float32/float64 CPU tensor [T, B, I]");
  const int64_t T = x.size(0), B = x.size(1), H = w_hh[0].size(0);
  TORCH_CHECK(hx.sizes() == at::IntArrayRef({L, B, H}) && hx.is_contiguous() && hx.scalar_type() == x.scalar_type(),
              "matrec_cpu: hx must be contiguous [L, B, H] of x's dtype");
  auto same = [&](const at::Tensor& t, at::IntArrayRef shape) {
    return t.sizes() == shape && t.is_contiguous() && t.scalar_type() == x.scalar_type() && t.device().is_cpu();
  };
  at::Tensor h_n = at::empty({L, B, H}, x.options());
  at::Tensor inp = x;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t I = inp.size(2);
    TORCH_CHECK(same(w_ih[l], {H, I}) && same(w_hh[l], {H, H}), "matrec_cpu: layer ", l,
                ": w_ih must be [H, I], w_hh [H, H], contiguous, of x's dtype");
    for (const auto* list : {&b_ih, &b_hh}) {
      const c10::optional<at::Tensor> bias = (*list)[l];
      TORCH_CHECK(!bias.has_value() || same(*bias, {H}), "matrec_cpu: layer ", l, ": biases must be [H]");
    }
    const c10::optional<at::Tensor> pb = phi_b[l];
    TORCH_CHECK((code == kModrelu) == pb.has_value() && (!pb.has_value() || same(*pb, {H})),
                "matrec_cpu: layer ", l, ": the modReLU bias is [H], given exactly for modReLU");
    at::Tensor out = at::empty({T, B, H}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "matrec_cpu_layers", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      const c10::optional<at::Tensor> bi = b_ih[l], bh = b_hh[l];
      const scalar_t* pi = bi.has_value() ? bi->data_ptr<scalar_t>() : nullptr;
      const scalar_t* ph = bh.has_value() ? bh->data_ptr<scalar_t>() : nullptr;
      for (int64_t r = 0; r < T * B; ++r) {
        scalar_t* row = o + r * H;
        for (int64_t j = 0; j < H; ++j) row[j] = (pi ? pi[j] : scalar_t(0)) + (ph ? ph[j] : scalar_t(0));
      }
      gemm_acc<scalar_t>(inp.data_ptr<scalar_t>(), w_ih[l].data_ptr<scalar_t>(), o, T * B, H, I,
                         /*trans_w=*/true, w_ih[l]);
      const scalar_t* h0 = hx.data_ptr<scalar_t>() + l * B * H;
      run_loop<scalar_t>(o, w_hh[l].data_ptr<scalar_t>(), h0, pb.has_value() ? pb->data_ptr<scalar_t>() : nullptr,
                         T, B, H, code, w_hh[l]);
      std::memcpy(h_n.data_ptr<scalar_t>() + l * B * H, o + (T - 1) * B * H, sizeof(scalar_t) * B * H);
    });
    inp = out;
  }
  return {inp, h_n};
}

// The reverse recurrence from the states alone. grad_out [T, B, H] = dL/dh_t from outside, out
// the forward's states. Returns (gz [T, B, H] = dL/dz_t = dL/dx_t, dL/dh0 [B, H], dL/db [H]: the
// modReLU bias's gradient, zeros for the other nonlinearities).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& out,
                                            const at::Tensor& w, int64_t code) {
  check(out, w, code);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous() &&
              grad_out.scalar_type() == out.scalar_type(), "matrec_cpu: grad_out must match out");
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2), n = B * H;
  at::Tensor gz = grad_out.clone();  // gz_t starts as g_t, gains gz_{t+1} W, then times phi'
  at::Tensor gh0 = at::zeros({B, H}, out.options());
  at::Tensor gb = at::zeros({H}, out.options().dtype(at::kDouble));
  std::vector<double> db(static_cast<size_t>(H), 0.0);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "matrec_cpu_backward", [&] {
    scalar_t* g = gz.data_ptr<scalar_t>();
    const scalar_t* h = out.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      scalar_t* gt = g + t * n;
      if (t + 1 < T) gemm_acc<scalar_t>(gt + n, W, gt, B, H, H, /*trans_w=*/false, w);
      times_slope<scalar_t>(gt, h + t * n, n, H, code, db.data());
    }
    gemm_acc<scalar_t>(g, W, gh0.data_ptr<scalar_t>(), B, H, H, /*trans_w=*/false, w);
  });
  std::memcpy(gb.data_ptr<double>(), db.data(), sizeof(double) * H);
  return {gz, gh0, gb.to(out.scalar_type())};
}

std::string gemm_path() { return have_blas() ? "blas" : "aten"; }

}  // namespace

TORCH_LIBRARY(matrec_cpu, m) {
  m.def("forward(Tensor x, Tensor w, Tensor? h0, Tensor? b, int code) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor out, Tensor w, int code) -> (Tensor, Tensor, Tensor)");
  m.def("layers_forward(Tensor x, Tensor hx, Tensor[] w_ih, Tensor[] w_hh, Tensor?[] b_ih, Tensor?[] b_hh, "
        "Tensor?[] phi_b, int code) -> (Tensor, Tensor)");
  m.def("gemm_path() -> str", &gemm_path);
}

TORCH_LIBRARY_IMPL(matrec_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
  m.impl("layers_forward", &layers_forward);
}
