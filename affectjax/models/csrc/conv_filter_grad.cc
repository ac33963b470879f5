// The filter gradient of a 2D NHWC convolution on the CPU, as an XLA FFI
// custom call (affectjax/models/native_kernels.py builds and registers it).
//
//   dw[i, j, c, o] = sum over n, p, q of
//       x[n, p*sh + i - pt, q*sw + j - pl, c] * dy[n, p, q, o]
//
// (out-of-range input positions are the convolution's zero padding). XLA:CPU
// runs this as a convolution whose "kernel" is the whole output map, which
// Eigen blocks badly: 1.8x oneDNN's time for the custom CNN's layers
// (docs/BENCHMARKS.md, "The filter gradient, layer by layer"). Here it is
// what it is, a GEMM with a small output (Ci x Co per tap) and a long
// contraction over every output pixel:
//
//  * the rows (n, p) of the output are taken in blocks sized so that the
//    block's input and output-gradient rows stay in the core's L2 cache;
//  * in a block, for each tile of MR input channels x NV vectors of output
//    channels and each tap, a register-blocked micro-kernel accumulates the
//    rank-1 updates x[..., c] * dy[..., o] along each contiguous run of q
//    (the input positions of a run are `sw * Ci` floats apart), with no
//    im2col copy;
//  * the images, or for small maps the output channels, are split between
//    XLA's CPU worker threads (`affectjax::ParallelFor`).
//
// The vector width follows the machine the file is compiled on
// (-march=native): 16 floats with AVX-512, 8 with AVX, 4 otherwise.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <unistd.h>

#include "cpu_kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using affectjax::kVL;
using affectjax::LoadU;
using affectjax::vf;

#if defined(__AVX512F__)
constexpr int kMR = 12;  // input channels per tile: 12 x 2 accumulators
#elif defined(__AVX__)
constexpr int kMR = 6;   // the classic 6 x 16 tile of 16 AVX registers
#else
constexpr int kMR = 4;
#endif
constexpr int kNV = 2;  // vectors of output channels per tile

inline void AddU(float* p, vf v) { affectjax::StoreU(p, LoadU(p) + v); }

struct Geometry {
  int64_t n, h, w, ci;   // x
  int64_t ho, wo, co;    // dy
  int64_t kh, kw;        // taps
  int64_t sh, sw;        // strides
  int64_t pt, pl;        // padding before (top, left)
};

// The run of output columns q whose input column q*sw + j - pl is inside
// the image, for tap column j: [lo, hi).
inline void ColumnRun(const Geometry& g, int64_t j, int64_t* lo, int64_t* hi) {
  // w = q*sw + j - pl >= 0  <=>  q >= ceil((pl - j) / sw)
  int64_t a = g.pl - j;
  int64_t first = a <= 0 ? 0 : (a + g.sw - 1) / g.sw;
  // w <= W - 1  <=>  q <= floor((W - 1 + pl - j) / sw)
  int64_t b = g.w - 1 + g.pl - j;
  int64_t last = b < 0 ? -1 : b / g.sw;
  *lo = std::max<int64_t>(first, 0);
  *hi = std::min<int64_t>(last + 1, g.wo);
  if (*hi < *lo) *hi = *lo;
}

// One tile (M input channels from c0, V vectors of output channels from o0)
// of one tap (i, j), summed over the output rows [r0, r1) (r = n * ho + p),
// added into out (the tap's Ci x Co slice).
template <int M, int V>
void Tile(const Geometry& g, const float* x, const float* dy, int64_t r0,
          int64_t r1, int64_t i, int64_t q_lo, int64_t q_hi, int64_t x_col0,
          int64_t c0, int64_t o0, float* out) {
  vf acc[M][V];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = vf{};
  const int64_t len = q_hi - q_lo;
  const int64_t x_step = g.sw * g.ci;
  // (n, p) of row r0, then stepped: no division per row.
  int64_t n = r0 / g.ho, p = r0 - n * g.ho;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t h = p * g.sh + i - g.pt;
    if (h >= 0 && h < g.h && len > 0) {
      const float* xp = x + ((n * g.h + h) * g.w + x_col0) * g.ci + c0;
      const float* dp = dy + (r * g.wo + q_lo) * g.co + o0;
      for (int64_t q = 0; q < len; ++q, xp += x_step, dp += g.co) {
        vf d[V];
        for (int v = 0; v < V; ++v) d[v] = LoadU(dp + v * kVL);
        for (int m = 0; m < M; ++m) {
          const float xs = xp[m];
          for (int v = 0; v < V; ++v) acc[m][v] += xs * d[v];
        }
      }
    }
    if (++p == g.ho) {
      p = 0;
      ++n;
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) AddU(out + (c0 + m) * g.co + o0 + v * kVL, acc[m][v]);
}

// The output channels past the last whole vector, one float at a time.
void TileScalar(const Geometry& g, const float* x, const float* dy, int64_t r0,
                int64_t r1, int64_t i, int64_t q_lo, int64_t q_hi,
                int64_t x_col0, int64_t c0, int64_t m_count, int64_t o0,
                int64_t o_count, float* out) {
  const int64_t len = q_hi - q_lo;
  const int64_t x_step = g.sw * g.ci;
  for (int64_t m = 0; m < m_count; ++m) {
    for (int64_t o = 0; o < o_count; ++o) {
      float acc = 0.0f;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.ho, p = r - n * g.ho;
        const int64_t h = p * g.sh + i - g.pt;
        if (h < 0 || h >= g.h || len <= 0) continue;
        const float* xp = x + ((n * g.h + h) * g.w + x_col0) * g.ci + c0 + m;
        const float* dp = dy + (r * g.wo + q_lo) * g.co + o0 + o;
        for (int64_t q = 0; q < len; ++q, xp += x_step, dp += g.co)
          acc += *xp * *dp;
      }
      out[(c0 + m) * g.co + o0 + o] += acc;
    }
  }
}

template <int V>
void TileRows(int m, const Geometry& g, const float* x, const float* dy,
              int64_t r0, int64_t r1, int64_t i, int64_t q_lo, int64_t q_hi,
              int64_t x_col0, int64_t c0, int64_t o0, float* out) {
  // M is a template argument so that the accumulators live in registers;
  // the channel tail (Ci % kMR) takes the smaller instantiations.
  switch (m) {
#define AFFECTJAX_TILE_CASE(K) \
  case K:                      \
    if constexpr (K <= kMR) Tile<K, V>(g, x, dy, r0, r1, i, q_lo, q_hi, x_col0, c0, o0, out); \
    break;
    AFFECTJAX_TILE_CASE(1)
    AFFECTJAX_TILE_CASE(2)
    AFFECTJAX_TILE_CASE(3)
    AFFECTJAX_TILE_CASE(4)
    AFFECTJAX_TILE_CASE(5)
    AFFECTJAX_TILE_CASE(6)
    AFFECTJAX_TILE_CASE(7)
    AFFECTJAX_TILE_CASE(8)
    AFFECTJAX_TILE_CASE(9)
    AFFECTJAX_TILE_CASE(10)
    AFFECTJAX_TILE_CASE(11)
    AFFECTJAX_TILE_CASE(12)
#undef AFFECTJAX_TILE_CASE
    default:
      break;
  }
}

// 384 KiB, or half the L2 cache (glibc's sysconf) where that is smaller.
// Larger blocks (half of a 2 MiB L2) measured slower at 12 px, where each
// tile reads a strided quarter of every output-gradient row.
int64_t BlockBytes() {
  static const int64_t bytes = [] {
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    const int64_t cap = int64_t{384} << 10;
    return l2 > 0 ? std::min<int64_t>(cap, std::max<int64_t>(l2 / 2, 128 << 10)) : cap;
  }();
  return bytes;
}

// dw (kh * kw * ci * co floats, zeroed by the caller) += the filter gradient
// over images [n0, n1), output channels [o_begin, o_end).
void FilterGrad(const Geometry& g, const float* x, const float* dy, int64_t n0,
                int64_t n1, int64_t o_begin, int64_t o_end, float* dw) {
  // Rows per block: the block's x rows (sh per output row, plus the taps'
  // overlap) and dy rows within BlockBytes.
  const int64_t row_bytes = (g.sh * g.w * g.ci + g.wo * g.co) * 4;
  const int64_t block = std::max<int64_t>(1, BlockBytes() / std::max<int64_t>(row_bytes, 1));
  const int64_t tap_size = g.ci * g.co;
  // Input channels per tile. Tiles of 8 where 12 leaves a narrow tail
  // (Ci = 32, 64, 128) measured slower than 12s and the tail.
  const int64_t mr = kMR;
  std::vector<int64_t> q_lo(g.kw), q_hi(g.kw);
  for (int64_t j = 0; j < g.kw; ++j) ColumnRun(g, j, &q_lo[j], &q_hi[j]);
  for (int64_t r0 = n0 * g.ho; r0 < n1 * g.ho; r0 += block) {
    const int64_t r1 = std::min(r0 + block, n1 * g.ho);
    for (int64_t c0 = 0; c0 < g.ci; c0 += mr) {
      const int m = static_cast<int>(std::min<int64_t>(mr, g.ci - c0));
      for (int64_t o0 = o_begin; o0 < o_end;) {
        const int64_t left = o_end - o0;
        const int64_t step = left >= kNV * kVL ? kNV * kVL : left >= kVL ? kVL : left;
        for (int64_t i = 0; i < g.kh; ++i) {
          for (int64_t j = 0; j < g.kw; ++j) {
            float* out = dw + (i * g.kw + j) * tap_size;
            const int64_t x_col0 = q_lo[j] * g.sw + j - g.pl;
            if (step == kNV * kVL) {
              TileRows<kNV>(m, g, x, dy, r0, r1, i, q_lo[j], q_hi[j], x_col0, c0, o0, out);
            } else if (step == kVL) {
              TileRows<1>(m, g, x, dy, r0, r1, i, q_lo[j], q_hi[j], x_col0, c0, o0, out);
            } else {
              TileScalar(g, x, dy, r0, r1, i, q_lo[j], q_hi[j], x_col0, c0, m, o0, step, out);
            }
          }
        }
        o0 += step;
      }
    }
  }
}

// The work is split between threads in one of two ways. Over images, each
// unit summing into a float32 buffer of its own (unit 0 into the output),
// the buffers added at the end: for large maps, where that addition is
// nothing beside the GEMM. Over output channels, each unit writing its own
// columns of the output: for small maps with many channels (VGG16's 7-14
// px, 512 channels), where per-thread copies of the 9.4 MB gradient cost
// more than the GEMM's imbalance.
ffi::Error ConvFilterGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                              int64_t stride_w, int64_t pad_top,
                              int64_t pad_left) {
  auto xd = x.dimensions();
  auto dyd = dy.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("conv_filter_grad: x, dy and dw must be 4-D (NHWC, NHWC, HWIO).");
  Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], dyd[3],
             wd[0], wd[1], stride_h, stride_w, pad_top, pad_left};
  if (dyd[0] != g.n || wd[2] != g.ci || wd[3] != g.co || g.sh < 1 || g.sw < 1)
    return ffi::Error::InvalidArgument("conv_filter_grad: shapes or strides do not match.");
  const int64_t size = g.kh * g.kw * g.ci * g.co;
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.0f);
  if (g.n == 0 || g.ho == 0 || g.wo == 0) return ffi::Error::Success();

  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Output channel tiles to share out, and the output pixels each element
  // of the gradient sums: with fewer than 4096 pixels per thread, a copy of
  // the gradient per thread costs more than a tenth of the GEMM.
  const int64_t tile = kNV * kVL;
  const int64_t o_tiles = (g.co + tile - 1) / tile;
  const int64_t pixels = g.n * g.ho * g.wo;
  if (threads > 1 && o_tiles >= 2 * threads && pixels < 4096 * threads) {
    affectjax::ParallelFor(pool, threads, [&](int64_t u) {
      FilterGrad(g, xs, dys, 0, g.n, std::min(g.co, (u * o_tiles / threads) * tile),
                 std::min(g.co, ((u + 1) * o_tiles / threads) * tile), out);
    });
    return ffi::Error::Success();
  }
  const int64_t units = std::min<int64_t>(g.n, threads);
  std::vector<std::vector<float>> sums(units);
  for (int64_t u = 1; u < units; ++u) sums[u].assign(size, 0.0f);
  affectjax::ParallelFor(pool, units, [&](int64_t u) {
    FilterGrad(g, xs, dys, u * g.n / units, (u + 1) * g.n / units, 0, g.co,
               u == 0 ? out : sums[u].data());
  });
  for (int64_t u = 1; u < units; ++u)
    for (int64_t k = 0; k < size; ++k) out[k] += sums[u][k];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectjaxConvFilterGrad, ConvFilterGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
