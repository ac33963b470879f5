// The forward pass of a depthwise 2D convolution (one k x k filter per
// channel, NHWC input, (kh, kw, C) filter) on the CPU, as an XLA FFI custom
// call (affectjax/models/native_kernels.py builds and registers it).
//
//   y[n, p, q, c] = sum over i, j of x[n, p*sh + i - pt, q*sw + j - pl, c] * w[i, j, c]
//
// (out-of-range input positions are zero padding). For each output row,
// vectors of channels times blocks of 4 output columns accumulate in
// registers over the taps, reading x in place: no padded copy and no
// per-tap slices, which is what XLA makes of the same sum
// (affectjax/models/depthwise.py's shifted multiply-adds): 1.2-2.7x its time
// on EfficientNet-B3's layers (docs/BENCHMARKS.md). The rows are shared out
// between XLA's CPU threads in 4 blocks per thread.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using affectjax::kVL;
using affectjax::LoadU;
using affectjax::StoreU;
using affectjax::vf;

// Shapes: x (n, h, w, c), y (n, ho, wo, c), taps kh x kw, strides, padding before.
struct G { int64_t n, h, w, c, ho, wo, kh, kw, sh, sw, pt, pl; };

// x (n, h, w, c), an output-shaped y or dy (n, ho, wo, c) and a (kh, kw, c)
// filter; false where the shapes or strides do not match.
template <typename Dims>
bool MakeGeometry(Dims xd, Dims yd, Dims wd, int64_t sh, int64_t sw, int64_t pt,
                  int64_t pl, G* g) {
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 3 || wd[2] != xd[3] ||
      yd[0] != xd[0] || yd[3] != xd[3] || sh < 1 || sw < 1)
    return false;
  *g = G{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[0], wd[1], sh, sw, pt, pl};
  return true;
}

// Output rows [r0, r1) (r = n*ho + p): y[r, q, :] = sum_ij x[..] * w[i, j, :].
void Rows(const G& g, const float* x, const float* w, float* y, int64_t r0, int64_t r1) {
  constexpr int QB = 4;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.ho, p = r - n * g.ho;
    float* yr = y + r * g.wo * g.c;
    for (int64_t c0 = 0; c0 < g.c; c0 += kVL) {
      const bool full = c0 + kVL <= g.c;
      for (int64_t q0 = 0; q0 < g.wo; q0 += QB) {
        const int qn = (int)std::min<int64_t>(QB, g.wo - q0);
        vf acc[QB];
        for (int b = 0; b < QB; ++b) acc[b] = vf{};
        if (full) {
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t hh = p * g.sh + i - g.pt;
            if (hh < 0 || hh >= g.h) continue;
            const float* xrow = x + ((n * g.h + hh) * g.w) * g.c + c0;
            for (int64_t j = 0; j < g.kw; ++j) {
              const vf wv = LoadU(w + (i * g.kw + j) * g.c + c0);
              for (int b = 0; b < qn; ++b) {
                const int64_t ww = (q0 + b) * g.sw + j - g.pl;
                if (ww < 0 || ww >= g.w) continue;
                acc[b] += LoadU(xrow + ww * g.c) * wv;
              }
            }
          }
          for (int b = 0; b < qn; ++b) StoreU(yr + (q0 + b) * g.c + c0, acc[b]);
        } else {
          for (int b = 0; b < qn; ++b)
            for (int64_t cc = c0; cc < g.c; ++cc) {
              float s = 0;
              for (int64_t i = 0; i < g.kh; ++i) {
                const int64_t hh = p * g.sh + i - g.pt;
                if (hh < 0 || hh >= g.h) continue;
                for (int64_t j = 0; j < g.kw; ++j) {
                  const int64_t ww = (q0 + b) * g.sw + j - g.pl;
                  if (ww < 0 || ww >= g.w) continue;
                  s += x[((n * g.h + hh) * g.w + ww) * g.c + cc] * w[(i * g.kw + j) * g.c + cc];
                }
              }
              yr[(q0 + b) * g.c + cc] = s;
            }
        }
      }
    }
  }
}

// Rows in 4 blocks per thread, claimed by whichever thread is free.
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  G g;
  if (!MakeGeometry(x.dimensions(), y->dimensions(), w.dimensions(), sh, sw, pt, pl, &g))
    return ffi::Error::InvalidArgument("depthwise_conv: shapes or strides do not match.");
  const int64_t rows = g.n * g.ho;
  if (rows == 0) return ffi::Error::Success();
  const int64_t units = std::min<int64_t>(rows, std::max<int64_t>(1, pool.num_threads()) * 4);
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  affectjax::ParallelFor(pool, units, [&](int64_t u) {
    Rows(g, xs, ws, ys, u * rows / units, (u + 1) * rows / units);
  });
  return ffi::Error::Success();
}

// The filter gradient: dw[i, j, c] = sum over n, p, q of
// x[n, p*sh + i - pt, q*sw + j - pl, c] * dy[n, p, q, c], over output rows
// [r0, r1), added into acc (kh * kw * c floats). For each row and vector of
// channels, every tap's accumulator stays in a register (KH x KW of them,
// fixed for 3x3 and 5x5) while the row's columns stream past once.
template <int KH, int KW>
void FilterGradRows(const G& g, const float* x, const float* dy, float* acc_out,
                    int64_t r0, int64_t r1) {
  const int64_t kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  constexpr int kTaps = KH > 0 ? KH * KW : 1;
  std::vector<vf> heap(KH > 0 ? 0 : g.kh * g.kw);
  for (int64_t c0 = 0; c0 + kVL <= g.c; c0 += kVL) {
    vf regs[kTaps];
    vf* acc = KH > 0 ? regs : heap.data();
    for (int64_t t = 0; t < kh * kw; ++t) acc[t] = vf{};
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.ho, p = r - n * g.ho;
      const float* dyr = dy + r * g.wo * g.c + c0;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hh = p * g.sh + i - g.pt;
        if (hh < 0 || hh >= g.h) continue;
        const float* xrow = x + ((n * g.h + hh) * g.w) * g.c + c0;
        for (int64_t q = 0; q < g.wo; ++q) {
          const vf d = LoadU(dyr + q * g.c);
          const int64_t w0 = q * g.sw - g.pl;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t ww = w0 + j;
            if (ww < 0 || ww >= g.w) continue;
            acc[i * kw + j] += LoadU(xrow + ww * g.c) * d;
          }
        }
      }
    }
    for (int64_t t = 0; t < kh * kw; ++t) {
      float* o = acc_out + t * g.c + c0;
      StoreU(o, LoadU(o) + acc[t]);
    }
  }
  // Channels past the last whole vector.
  for (int64_t c = g.c - g.c % kVL; c < g.c; ++c)
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.ho, p = r - n * g.ho;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hh = p * g.sh + i - g.pt;
        if (hh < 0 || hh >= g.h) continue;
        for (int64_t q = 0; q < g.wo; ++q)
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t ww = q * g.sw + j - g.pl;
            if (ww < 0 || ww >= g.w) continue;
            acc_out[(i * kw + j) * g.c + c] +=
                x[((n * g.h + hh) * g.w + ww) * g.c + c] * dy[(r * g.wo + q) * g.c + c];
          }
      }
    }
}

// dw (kh * kw * c floats, zeroed) += the filter gradient over rows [r0, r1).
void FilterGradDispatch(const G& g, const float* x, const float* dy, float* out,
                        int64_t r0, int64_t r1) {
  if (g.kh == 3 && g.kw == 3) {
    FilterGradRows<3, 3>(g, x, dy, out, r0, r1);
  } else if (g.kh == 5 && g.kw == 5) {
    FilterGradRows<5, 5>(g, x, dy, out, r0, r1);
  } else {
    FilterGradRows<0, 0>(g, x, dy, out, r0, r1);
  }
}

// Rows in one block per thread, each summing into a buffer of its own
// (kh * kw * c floats: small), added at the end.
ffi::Error GradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  G g;
  if (!MakeGeometry(x.dimensions(), dy.dimensions(), dw->dimensions(), sh, sw, pt, pl, &g))
    return ffi::Error::InvalidArgument("depthwise_filter_grad: shapes or strides do not match.");
  const int64_t size = g.kh * g.kw * g.c;
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.0f);
  const int64_t rows = g.n * g.ho;
  if (rows == 0 || g.wo == 0) return ffi::Error::Success();
  const int64_t units = std::min<int64_t>(rows, std::max<int64_t>(1, pool.num_threads()));
  std::vector<std::vector<float>> sums(units, std::vector<float>(size, 0.0f));
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  affectjax::ParallelFor(pool, units, [&](int64_t u) {
    FilterGradDispatch(g, xs, dys, sums[u].data(), u * rows / units, (u + 1) * rows / units);
  });
  for (int64_t u = 0; u < units; ++u)
    for (int64_t k = 0; k < size; ++k) out[k] += sums[u][k];
  return ffi::Error::Success();
}
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectjaxDepthwiseConv, Impl, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pl"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectjaxDepthwiseFilterGrad, GradImpl, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pl"));
