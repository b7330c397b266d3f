// Direct sparse convolution and CSR x dense linear for ntksap.sparse (float32, CPU).
//
// Direct sparse convolution (Park et al., "Faster CNNs with direct sparse convolutions and
// guided pruning", ICLR 2017): the weights are CSR over (out_channels, in_channels*kh*kw).
// For every output channel o, every nonzero weight w = W[o, c, dy, dx] multiplies ONE
// contiguous strip of the padded input plane c (starting at row dy, column dx) and
// accumulates into the output plane. The strip view works because the output is computed
// in the padded input's row width ("wide" rows): out_wide[y * Wq + x] for x < Wq, of which
// only x < Wo are kept. Strides s > 1 use the same contiguous strips on the s*s polyphase
// components of the padded input: phase (py, px) holds in_pad[s*i + py, s*j + px], so
// in_pad[s*y + dy, s*x + dx] = phase(dy % s, dx % s)[y + dy / s, x + dx / s].
//
// Work split: at::parallel_for over (image, output channel) pairs (torch's thread pool,
// so torch.set_num_threads applies). The inner loop keeps a chunk of up to 8 x 16 output
// floats in AVX-512 registers (or a plain loop the compiler vectorises) and streams every
// nonzero of the row over it: one load + one FMA per 16 MACs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kVec = 16;  // floats per AVX-512 register
constexpr int64_t kSlack = 8 * kVec + 64;  // readable garbage after every plane (floats)

// acc[0 : V*16) = sum_j vals[j] * base[offs[j] + 0 : V*16)
template <int V>
inline void strip_chunk(const float* __restrict base, const int64_t* __restrict offs,
                        const float* __restrict vals, int64_t nnz, float* __restrict acc) {
#ifdef __AVX512F__
  __m512 r[V];
  for (int v = 0; v < V; ++v) r[v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nnz; ++j) {
    const __m512 w = _mm512_set1_ps(vals[j]);
    const float* p = base + offs[j];
    for (int v = 0; v < V; ++v) r[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + v * kVec), r[v]);
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + v * kVec, r[v]);
#else
  float r[V * kVec];
  for (int i = 0; i < V * kVec; ++i) r[i] = 0.f;
  for (int64_t j = 0; j < nnz; ++j) {
    const float w = vals[j];
    const float* p = base + offs[j];
#pragma GCC ivdep
    for (int i = 0; i < V * kVec; ++i) r[i] += w * p[i];
  }
  for (int i = 0; i < V * kVec; ++i) acc[i] = r[i];
#endif
}

void check_csr(const torch::Tensor& rowptr, const torch::Tensor& col, const torch::Tensor& val,
               int64_t rows) {
  TORCH_CHECK(rowptr.dtype() == torch::kInt32 && col.dtype() == torch::kInt32,
              "rowptr and col_idx must be int32");
  TORCH_CHECK(val.dtype() == torch::kFloat32, "values must be float32");
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) == rows + 1,
              "rowptr must have out_channels + 1 entries");
  TORCH_CHECK(rowptr.is_contiguous() && col.is_contiguous() && val.is_contiguous(),
              "CSR arrays must be contiguous");
  TORCH_CHECK(col.numel() == val.numel(), "col_idx and values must have the same length");
}

}  // namespace

// x: (N, C, H, W) float32; CSR over (O, C*kh*kw) with column c*kh*kw + dy*kw + dx;
// bias: (O,) or empty; residual: (N, O, Ho, Wo) or empty; out: (N, O, Ho, Wo) buffer or empty;
// returns act(conv + bias + residual) (in `out` when it fits).
torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor rowptr, torch::Tensor col,
                            torch::Tensor val, torch::Tensor bias, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, torch::Tensor residual, bool relu,
                            torch::Tensor out) {
  TORCH_CHECK(x.dim() == 4 && x.dtype() == torch::kFloat32, "x must be (N, C, H, W) float32");
  TORCH_CHECK(stride >= 1 && pad >= 0 && kh >= 1 && kw >= 1, "bad conv geometry");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = rowptr.size(0) - 1;
  check_csr(rowptr, col, val, O);
  const int64_t s = stride;
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad;
  TORCH_CHECK(Hp >= kh && Wp >= kw, "input smaller than the kernel");
  const int64_t Ho = (Hp - kh) / s + 1, Wo = (Wp - kw) / s + 1;
  const int64_t Hq = (Hp + s - 1) / s, Wq = (Wp + s - 1) / s;  // polyphase plane size
  const int64_t plane = (Hq + 1) * Wq;                          // +1 row: strips may overrun
  const int64_t per_image = C * s * s * plane + kSlack;
  const int64_t L = Ho * Wq;                                     // wide output strip length
  const int64_t Lr = (L + kVec - 1) / kVec * kVec;

  const bool has_bias = bias.defined() && bias.numel() > 0;
  const bool has_res = residual.defined() && residual.numel() > 0;
  if (has_bias) TORCH_CHECK(bias.numel() == O && bias.dtype() == torch::kFloat32, "bad bias");
  if (has_res) {
    residual = residual.contiguous();
    TORCH_CHECK(residual.sizes() == torch::IntArrayRef({N, O, Ho, Wo}) &&
                    residual.dtype() == torch::kFloat32,
                "residual must have the output's shape (N, O, Ho, Wo), float32");
  }
  // `out`: a caller's reusable buffer (a fresh multi-MB tensor per call costs ~1 ms of
  // page faults at batch 64 on the machine this was tuned on); allocated when unusable.
  if (!(out.defined() && out.sizes() == torch::IntArrayRef({N, O, Ho, Wo}) &&
        out.dtype() == torch::kFloat32 && out.is_contiguous() &&
        out.data_ptr() != x.data_ptr() && (!has_res || out.data_ptr() != residual.data_ptr())))
    out = torch::empty({N, O, Ho, Wo}, x.options());
  if (N == 0 || O == 0) return out;

  // Padded polyphase copy of the input: (N, C, s*s, Hq + 1, Wq) + slack, zero outside.
  // A per-calling-thread workspace that only grows: a fresh multi-MB buffer per call would
  // cost more in page faults than the whole sparse product.
  thread_local std::vector<float> workspace;
  if (static_cast<int64_t>(workspace.size()) < N * per_image) workspace.resize(N * per_image);
  const float* xp = x.data_ptr<float>();
  float* pp = workspace.data();
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      const float* src = xp + nc * H * W;
      float* dst0 = pp + n * per_image + c * s * s * plane;
      if (s == 1) {
        // Zero only what the copy leaves: top/bottom pad rows (+ the extra row), side pads.
        std::memset(dst0, 0, sizeof(float) * pad * Wq);
        std::memset(dst0 + (pad + H) * Wq, 0, sizeof(float) * (plane - (pad + H) * Wq));
        if (pad > 0)
          for (int64_t yy = 0; yy < H; ++yy) {
            float* row = dst0 + (yy + pad) * Wq;
            std::memset(row, 0, sizeof(float) * pad);
            std::memset(row + pad + W, 0, sizeof(float) * (Wq - pad - W));
          }
      } else {
        std::memset(dst0, 0, sizeof(float) * s * s * plane);
      }
      if (c == C - 1) std::memset(dst0 + s * s * plane, 0, sizeof(float) * kSlack);
      for (int64_t py = 0; py < s; ++py)
        for (int64_t px = 0; px < s; ++px) {
          float* dst = dst0 + (py * s + px) * plane;
          // phase row qy holds padded row s*qy + py = input row s*qy + py - pad
          for (int64_t qy = 0; qy < Hq; ++qy) {
            const int64_t yy = s * qy + py - pad;
            if (yy < 0 || yy >= H) continue;
            const float* srow = src + yy * W;
            float* drow = dst + qy * Wq;
            if (s == 1) {
              std::memcpy(drow + pad, srow, sizeof(float) * W);
            } else {
              // phase column qx holds input column s*qx + px - pad
              int64_t qx = (pad - px + s - 1) / s;  // first qx with s*qx + px - pad >= 0
              if (pad - px < 0) qx = 0;
              for (int64_t xx = s * qx + px - pad; qx < Wq && xx < W; ++qx, xx += s)
                drow[qx] = srow[xx];
            }
          }
        }
    }
  });

  // Offset of every nonzero's strip inside one image's prepared buffer.
  const int64_t nnz = col.numel();
  std::vector<int64_t> offs(nnz);
  const int32_t* cp = col.data_ptr<int32_t>();
  const int64_t khw = kh * kw;
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t cc = cp[j] / khw, r = cp[j] % khw, dy = r / kw, dx = r % kw;
    TORCH_CHECK(cc < C, "column index beyond in_channels * kh * kw");
    offs[j] = (cc * s * s + (dy % s) * s + (dx % s)) * plane + (dy / s) * Wq + (dx / s);
  }
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* resp = has_res ? residual.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();

  at::parallel_for(0, N * O, 1, [&](int64_t b, int64_t e) {
    std::vector<float> acc(Lr);
    for (int64_t no = b; no < e; ++no) {
      const int64_t n = no / O, o = no % O;
      const float* base = pp + n * per_image;
      const int64_t j0 = rp[o], j1 = rp[o + 1];
      const int64_t* of = offs.data() + j0;
      const float* vv = vp + j0;
      int64_t i = 0;
      for (; i + 8 * kVec <= Lr; i += 8 * kVec) strip_chunk<8>(base + i, of, vv, j1 - j0, &acc[i]);
      if (i + 4 * kVec <= Lr) { strip_chunk<4>(base + i, of, vv, j1 - j0, &acc[i]); i += 4 * kVec; }
      if (i + 2 * kVec <= Lr) { strip_chunk<2>(base + i, of, vv, j1 - j0, &acc[i]); i += 2 * kVec; }
      if (i + kVec <= Lr) { strip_chunk<1>(base + i, of, vv, j1 - j0, &acc[i]); i += kVec; }
      // Epilogue: keep the Wo valid columns of every wide row; + bias (+ residual), ReLU.
      const float bo = bp ? bp[o] : 0.f;
      float* dst = op + no * Ho * Wo;
      const float* res = resp ? resp + no * Ho * Wo : nullptr;
      for (int64_t y = 0; y < Ho; ++y) {
        const float* a = &acc[y * Wq];
        float* d = dst + y * Wo;
        if (res) {
          const float* rr = res + y * Wo;
          for (int64_t xx = 0; xx < Wo; ++xx) d[xx] = a[xx] + bo + rr[xx];
        } else {
          for (int64_t xx = 0; xx < Wo; ++xx) d[xx] = a[xx] + bo;
        }
        if (relu)
          for (int64_t xx = 0; xx < Wo; ++xx) d[xx] = d[xx] > 0.f ? d[xx] : 0.f;
      }
    }
  });
  return out;
}

// x: (N, K) float32; CSR over (O, K); returns act(x @ W.T + bias), (N, O).
torch::Tensor sparse_linear(torch::Tensor x, torch::Tensor rowptr, torch::Tensor col,
                            torch::Tensor val, torch::Tensor bias, bool relu) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32, "x must be (N, K) float32");
  x = x.contiguous();
  const int64_t N = x.size(0), K = x.size(1), O = rowptr.size(0) - 1;
  check_csr(rowptr, col, val, O);
  const bool has_bias = bias.defined() && bias.numel() > 0;
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const int32_t* cp = col.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  auto out = torch::empty({N, O}, x.options());
  float* op = out.data_ptr<float>();
  if (N == 0 || O == 0) return out;
  if (N < 8) {
    // Few samples: one gathered dot product per (sample, output).
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, O, 16, [&](int64_t b, int64_t e) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = b; o < e; ++o) {
          float a = bp ? bp[o] : 0.f;
          for (int32_t j = rp[o]; j < rp[o + 1]; ++j) a += vp[j] * xp[n * K + cp[j]];
          op[n * O + o] = relu && a < 0.f ? 0.f : a;
        }
    });
    return out;
  }
  // Many samples: out^T[o, :] = sum_j W[o, k_j] * x^T[k_j, :], contiguous along the batch.
  auto xt = x.t().contiguous();  // (K, N)
  const float* xtp = xt.data_ptr<float>();
  auto outt = torch::empty({O, N}, x.options());
  float* otp = outt.data_ptr<float>();
  at::parallel_for(0, O, 4, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      float* d = otp + o * N;
      const float bo = bp ? bp[o] : 0.f;
      for (int64_t n = 0; n < N; ++n) d[n] = bo;
      for (int32_t j = rp[o]; j < rp[o + 1]; ++j) {
        const float w = vp[j];
        const float* __restrict s = xtp + static_cast<int64_t>(cp[j]) * N;
        for (int64_t n = 0; n < N; ++n) d[n] += w * s[n];
      }
      if (relu)
        for (int64_t n = 0; n < N; ++n) d[n] = d[n] > 0.f ? d[n] : 0.f;
    }
  });
  out.copy_(outt.t());
  return out;
}

bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_conv2d", &sparse_conv2d, "direct sparse convolution (CSR weights), float32");
  m.def("sparse_linear", &sparse_linear, "CSR x dense linear, float32");
  m.def("has_avx512", &has_avx512, "compiled with AVX-512 intrinsics");
}
