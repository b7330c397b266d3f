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

namespace {

struct ConvGeometry {
  int64_t C, H, W, O, kh, kw, s, pad, Ho, Wo, Hq, Wq, plane;
  // element strides (image, channel, row; columns are contiguous) of the input, the output
  // and the residual: they may be views, e.g. the interior of a padded buffer
  int64_t xsN, xsC, xsH, osN, osC, osH, rsN, rsC, rsH;
};

// dst[0 : Wq) = [0] * pad + src[0 : W) + [0] * (Wq - pad - W): one padded input row.
// Rows are 8-34 floats here, so per-row loop and call overhead matters: AVX-512 masked
// loads/stores do a row in 1-3 instructions pairs (masked-off lanes are never touched, so
// reading "before" src or writing past dst[Wq) is safe).
inline void pad_row(float* __restrict dst, const float* __restrict src, int64_t W, int64_t pad,
                    int64_t Wq) {
#ifdef __AVX512F__
  for (int64_t k = 0; k < Wq; k += kVec) {
    const int64_t lo = std::max<int64_t>(0, pad - k);                    // first valid lane
    const int64_t hi = std::min<int64_t>(kVec, std::max<int64_t>(0, pad + W - k));  // end
    const __mmask16 ld = hi > lo ? static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1))
                                 : static_cast<__mmask16>(0);
    const __mmask16 st = static_cast<__mmask16>((1u << std::min<int64_t>(kVec, Wq - k)) - 1);
    _mm512_mask_storeu_ps(dst + k, st, _mm512_maskz_loadu_ps(ld, src + (k - pad)));
  }
#else
  for (int64_t k = 0; k < pad; ++k) dst[k] = 0.f;
  for (int64_t k = 0; k < W; ++k) dst[pad + k] = src[k];
  for (int64_t k = pad + W; k < Wq; ++k) dst[k] = 0.f;
#endif
}

// dst[k] = src[2 * k] for k < count: one row of a stride-2 polyphase component (the scalar
// strided loop was a tenth of the batch-64 time of ResNet-20's two downsampling stages).
inline void deinterleave_row(float* __restrict dst, const float* __restrict src, int64_t count) {
#ifdef __AVX512F__
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t k = 0; k < count; k += kVec) {
    const int64_t n = std::min<int64_t>(kVec, count - k);  // outputs in this step
    const int64_t m = 2 * n - 1;  // source floats read: src[2k, 2k + m)
    const __mmask16 lo = static_cast<__mmask16>((1u << std::min<int64_t>(kVec, m)) - 1);
    const __mmask16 hi = m > kVec ? static_cast<__mmask16>((1u << (m - kVec)) - 1) : 0;
    const __m512 a = _mm512_maskz_loadu_ps(lo, src + 2 * k);
    const __m512 b = _mm512_maskz_loadu_ps(hi, src + 2 * k + kVec);
    _mm512_mask_storeu_ps(dst + k, static_cast<__mmask16>((1u << n) - 1),
                          _mm512_permutex2var_ps(a, even, b));
  }
#else
  for (int64_t k = 0; k < count; ++k) dst[k] = src[2 * k];
#endif
}

// d[0 : len) = act(a[0 : len) + bias [+ r[0 : len)]): one output row segment of the epilogue.
template <bool kRes, bool kRelu>
inline void epilogue_row(const float* __restrict a, float* __restrict d, const float* __restrict r,
                         int64_t len, float bias) {
#ifdef __AVX512F__
  const __m512 b = _mm512_set1_ps(bias), z = _mm512_setzero_ps();
  for (int64_t k = 0; k < len; k += kVec) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(kVec, len - k)) - 1);
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + k), b);
    if (kRes) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r + k));
    if (kRelu) v = _mm512_max_ps(v, z);
    _mm512_mask_storeu_ps(d + k, m, v);
  }
#else
  for (int64_t k = 0; k < len; ++k) {
    float v = a[k] + bias + (kRes ? r[k] : 0.f);
    d[k] = kRelu ? std::max(v, 0.f) : v;
  }
#endif
}

// A group of G images' padded polyphase planes, laid out (C, s*s, G, plane) so that one
// input channel's planes of all G images are contiguous: a strip then runs across images.
// dst[((c*s*s + py*s + px) * G + g) * plane + qy*Wq + qx] =
//   x[n0 + g, c, s*qy + py - pad, s*qx + px - pad], zero outside the input.
// Only the phases some nonzero weight reads (`used`) are written (a 1x1 stride-2
// shortcut reads one of four). kSlack zeros follow the last plane.
void prepare_group(const float* __restrict src0, int64_t G, float* __restrict dst_grp,
                   const ConvGeometry& g, const std::vector<char>& used, int64_t c_begin,
                   int64_t c_end) {
  const int64_t s = g.s, pad = g.pad, H = g.H, W = g.W, Wq = g.Wq, Hq = g.Hq, plane = g.plane;
  for (int64_t c = c_begin; c < c_end; ++c)
    for (int64_t ph = 0; ph < s * s; ++ph) {
      if (!used[ph]) continue;
      const int64_t py = ph / s, px = ph % s;
      for (int64_t gi = 0; gi < G; ++gi) {
        const float* src = src0 + gi * g.xsN + c * g.xsC;
        float* dst = dst_grp + ((c * s * s + ph) * G + gi) * plane;
        if (s == 1) {
          // Zero the top pad rows and everything after the last input row (bottom pad,
          // the extra row); each input row becomes one padded row [0]*pad + src + [0]*...
          for (int64_t k = 0; k < pad * Wq; ++k) dst[k] = 0.f;
          for (int64_t k = (pad + H) * Wq; k < plane; ++k) dst[k] = 0.f;
          for (int64_t yy = 0; yy < H; ++yy) pad_row(dst + (yy + pad) * Wq, src + yy * g.xsH, W, pad, Wq);
          continue;
        }
        std::memset(dst, 0, sizeof(float) * plane);
        const int64_t qx0 = pad > px ? (pad - px + s - 1) / s : 0;  // first column inside
        const int64_t xx0 = s * qx0 + px - pad;
        const int64_t count = xx0 < W ? std::min(Wq - qx0, (W - 1 - xx0) / s + 1) : 0;
        for (int64_t qy = 0; qy < Hq; ++qy) {
          const int64_t yy = s * qy + py - pad;  // phase row qy = input row yy
          if (yy < 0 || yy >= H) continue;
          const float* __restrict srow = src + yy * g.xsH + xx0;
          float* __restrict drow = dst + qy * Wq + qx0;
          if (s == 2)
            deinterleave_row(drow, srow, count);
          else
            for (int64_t k = 0; k < count; ++k) drow[k] = srow[k * s];
        }
      }
    }
  if (c_end == g.C) std::memset(dst_grp + g.C * s * s * G * plane, 0, sizeof(float) * kSlack);
}

void dispatch_chunk(int64_t vecs, const float* base, const int64_t* offs, const float* vals,
                    int64_t n, float* acc) {
  switch (vecs) {
    case 16: strip_chunk<16>(base, offs, vals, n, acc); break;
    case 15: strip_chunk<15>(base, offs, vals, n, acc); break;
    case 14: strip_chunk<14>(base, offs, vals, n, acc); break;
    case 13: strip_chunk<13>(base, offs, vals, n, acc); break;
    case 12: strip_chunk<12>(base, offs, vals, n, acc); break;
    case 11: strip_chunk<11>(base, offs, vals, n, acc); break;
    case 10: strip_chunk<10>(base, offs, vals, n, acc); break;
    case 9: strip_chunk<9>(base, offs, vals, n, acc); break;
    case 8: strip_chunk<8>(base, offs, vals, n, acc); break;
    case 7: strip_chunk<7>(base, offs, vals, n, acc); break;
    case 6: strip_chunk<6>(base, offs, vals, n, acc); break;
    case 5: strip_chunk<5>(base, offs, vals, n, acc); break;
    case 4: strip_chunk<4>(base, offs, vals, n, acc); break;
    case 3: strip_chunk<3>(base, offs, vals, n, acc); break;
    case 2: strip_chunk<2>(base, offs, vals, n, acc); break;
    default: strip_chunk<1>(base, offs, vals, n, acc); break;
  }
}

// Output channels [o_begin, o_end) of a group of G images from its prepared planes.
// The wide output strip of the group has G * plane floats (image gi at gi * plane, row y
// at y * Wq; rows >= Ho and columns >= Wo are garbage). Chunk-outer, channel-inner: one
// chunk (up to 16 x 16 floats, in registers) is computed for every output channel in turn,
// so the input window it reads stays in L1/L2 across channels.
void conv_group(const float* __restrict prep, int64_t G, const ConvGeometry& g,
                const int32_t* rp, const int64_t* offs, const float* vals, const float* bias,
                const float* res_grp, float* out_grp, bool relu, int64_t o_begin,
                int64_t o_end) {
  alignas(64) float acc[16 * kVec];
  const int64_t Wq = g.Wq, Wo = g.Wo, Ho = g.Ho, rows_per_img = g.Hq + 1;
  // The strip ends after the last valid output of the last image.
  const int64_t L = (G - 1) * g.plane + Ho * Wq;
  const int64_t Lr = (L + kVec - 1) / kVec * kVec;
  // Valid output segments of the current chunk: (offset in acc, length, offset in the
  // group's output for channel 0). Computed once per chunk, used by every output channel
  // (the divisions here were most of the epilogue's cost on 8x8 maps).
  struct Seg {
    int64_t a, len, at, rat;  // rat: the same position in the residual
  };
  std::vector<Seg> segs;
  segs.reserve(16 * kVec / std::max<int64_t>(1, Wq) + 2);
  for (int64_t i0 = 0; i0 < Lr; i0 += 16 * kVec) {
    const int64_t vecs = std::min<int64_t>(16, (Lr - i0) / kVec);
    const int64_t i1 = std::min(i0 + vecs * kVec, L);
    segs.clear();
    for (int64_t R = i0 / Wq; R * Wq < i1; ++R) {
      const int64_t gi = R / rows_per_img, y = R % rows_per_img;
      if (y >= Ho) continue;
      const int64_t a = std::max(i0, R * Wq), b = std::min(i1, R * Wq + Wo);
      const int64_t x0 = a - R * Wq;
      if (a < b)
        segs.push_back({a - i0, b - a, gi * g.osN + y * g.osH + x0, gi * g.rsN + y * g.rsH + x0});
    }
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int64_t j0 = rp[o], n = rp[o + 1] - j0;
      if (n > 0) {
        dispatch_chunk(vecs, prep + i0, offs + j0, vals + j0, n, acc);
      } else {
        std::memset(acc, 0, sizeof(float) * vecs * kVec);  // a dead channel: bias only
      }
      const float bo = bias ? bias[o] : 0.f;
      const int64_t oo = o * g.osC, ro = o * g.rsC;
      if (res_grp) {
        if (relu)
          for (const Seg& q : segs)
            epilogue_row<true, true>(acc + q.a, out_grp + q.at + oo, res_grp + q.rat + ro, q.len, bo);
        else
          for (const Seg& q : segs)
            epilogue_row<true, false>(acc + q.a, out_grp + q.at + oo, res_grp + q.rat + ro, q.len,
                                      bo);
      } else {
        if (relu)
          for (const Seg& q : segs)
            epilogue_row<false, true>(acc + q.a, out_grp + q.at + oo, nullptr, q.len, bo);
        else
          for (const Seg& q : segs)
            epilogue_row<false, false>(acc + q.a, out_grp + q.at + oo, nullptr, q.len, bo);
      }
    }
  }
}

}  // namespace

// A strided float32 4-d tensor whose last dimension is contiguous, else a contiguous copy.
torch::Tensor rows_contiguous(const torch::Tensor& t) {
  return t.stride(3) == 1 && t.stride(2) >= t.size(3) ? t : t.contiguous();
}

// x: (N, C, H, W) float32; CSR over (O, C*kh*kw) with column c*kh*kw + dy*kw + dx;
// bias: (O,) or empty; residual: (N, O, Ho, Wo) or empty; out: (N, O, Ho, Wo) buffer or empty;
// returns act(conv + bias + residual) (in `out` when it fits). x, residual and out may be
// strided views whose rows are contiguous (e.g. the interior of a zero-padded buffer).
// x_padded: the caller promises that x is the interior [pad : pad + H, pad : pad + W] of a
// buffer (N, C, H + 2 pad + 1, W + 2 pad) whose border is zero and which is followed by at
// least kSlack readable floats (what ntksap.sparse's BufferPool.get(pad=...) gives). When x's
// strides say so too, a stride-1 conv reads that buffer in place: no padded copy.
torch::Tensor sparse_conv2d(torch::Tensor x, torch::Tensor rowptr, torch::Tensor col,
                            torch::Tensor val, torch::Tensor bias, int64_t kh, int64_t kw,
                            int64_t stride, int64_t pad, torch::Tensor residual, bool relu,
                            torch::Tensor out, bool x_padded) {
  TORCH_CHECK(x.dim() == 4 && x.dtype() == torch::kFloat32, "x must be (N, C, H, W) float32");
  TORCH_CHECK(stride >= 1 && pad >= 0 && kh >= 1 && kw >= 1, "bad conv geometry");
  x = rows_contiguous(x);
  ConvGeometry g;
  const int64_t N = x.size(0);
  g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = rowptr.size(0) - 1;
  check_csr(rowptr, col, val, g.O);
  g.kh = kh, g.kw = kw, g.s = stride, g.pad = pad;
  const int64_t Hp = g.H + 2 * pad, Wp = g.W + 2 * pad;
  TORCH_CHECK(Hp >= kh && Wp >= kw, "input smaller than the kernel");
  g.Ho = (Hp - kh) / g.s + 1, g.Wo = (Wp - kw) / g.s + 1;
  g.Hq = (Hp + g.s - 1) / g.s, g.Wq = (Wp + g.s - 1) / g.s;  // polyphase plane size
  g.plane = (g.Hq + 1) * g.Wq;  // +1 row: strips of garbage columns may overrun
  g.xsN = x.stride(0), g.xsC = x.stride(1), g.xsH = x.stride(2);
  const int64_t O = g.O, Ho = g.Ho, Wo = g.Wo, s = g.s;

  const bool has_bias = bias.defined() && bias.numel() > 0;
  const bool has_res = residual.defined() && residual.numel() > 0;
  if (has_bias) TORCH_CHECK(bias.numel() == O && bias.dtype() == torch::kFloat32, "bad bias");
  if (has_res) {
    TORCH_CHECK(residual.sizes() == torch::IntArrayRef({N, O, Ho, Wo}) &&
                    residual.dtype() == torch::kFloat32,
                "residual must have the output's shape (N, O, Ho, Wo), float32");
    residual = rows_contiguous(residual);
  }
  // `out`: a caller's reusable buffer (a fresh multi-MB tensor per call costs ~1 ms of
  // page faults at batch 64 on the machine this was tuned on); allocated when unusable.
  auto overlaps = [](const torch::Tensor& a, const torch::Tensor& b) {
    const char* a0 = static_cast<const char*>(a.data_ptr());
    const char* b0 = static_cast<const char*>(b.data_ptr());
    const int64_t an = (a.size(0) - 1) * a.stride(0) + (a.size(1) - 1) * a.stride(1) +
                       (a.size(2) - 1) * a.stride(2) + a.size(3);
    const int64_t bn = (b.size(0) - 1) * b.stride(0) + (b.size(1) - 1) * b.stride(1) +
                       (b.size(2) - 1) * b.stride(2) + b.size(3);
    return a0 < b0 + 4 * bn && b0 < a0 + 4 * an;
  };
  if (!(out.defined() && out.dim() == 4 && out.sizes() == torch::IntArrayRef({N, O, Ho, Wo}) &&
        out.dtype() == torch::kFloat32 && out.stride(3) == 1 && out.stride(2) >= Wo &&
        out.stride(1) >= Ho * out.stride(2) && out.stride(0) >= O * out.stride(1) &&
        (N == 0 || O == 0 || (!overlaps(out, x) && (!has_res || !overlaps(out, residual))))))
    out = torch::empty({N, O, Ho, Wo}, x.options());
  if (N == 0 || O == 0) return out;
  g.osN = out.stride(0), g.osC = out.stride(1), g.osH = out.stride(2);
  g.rsN = has_res ? residual.stride(0) : 0, g.rsC = has_res ? residual.stride(1) : 0;
  g.rsH = has_res ? residual.stride(2) : 0;

  // In place: x is the interior of a zero-bordered buffer laid out exactly like one
  // image's prepared planes (C, plane), so a group is one image and needs no copy. (Even
  // on 8x8 maps, where several images per strip would cut loop overhead, skipping the
  // copy measured faster: ResNet-20 layer3 convs 0.16 -> 0.10-0.13 ms at batch 64.)
  const bool in_place = x_padded && s == 1 && g.xsH == Wp && g.xsC == g.plane &&
                        g.xsN == g.C * g.plane;

  // Images per group: enough that a group's strip is ~1000 floats (small feature maps
  // otherwise spend their time in per-channel loop overhead), and enough groups for the
  // threads.
  const int64_t threads = at::get_num_threads();
  int64_t G = std::max<int64_t>(1, 1024 / g.plane);
  G = std::min(G, std::max<int64_t>(1, N / (2 * threads)));
  if (in_place) G = 1;
  const int64_t groups = (N + G - 1) / G;
  auto group_size = [&](int64_t gr) { return std::min(G, N - gr * G); };
  const int64_t per_group = g.C * s * s * G * g.plane + kSlack;

  // Strip offset of every nonzero inside a group's prepared planes (depends on G), and
  // which polyphase components are read at all.
  const int64_t nnz = col.numel();
  const int32_t* cp = col.data_ptr<int32_t>();
  const int64_t khw = kh * kw;
  std::vector<char> used(s * s, 0);
  auto offsets = [&](int64_t gsize, std::vector<int64_t>& offs) {
    offs.resize(nnz);
    for (int64_t j = 0; j < nnz; ++j) {
      const int64_t cc = cp[j] / khw, r = cp[j] % khw, dy = r / kw, dx = r % kw;
      TORCH_CHECK(cp[j] >= 0 && cc < g.C, "column index beyond in_channels * kh * kw");
      const int64_t ph = (dy % s) * s + (dx % s);
      used[ph] = 1;
      offs[j] = ((cc * s * s + ph) * gsize) * g.plane + (dy / s) * g.Wq + (dx / s);
    }
  };
  std::vector<int64_t> offs_full, offs_last;
  offsets(G, offs_full);
  const int64_t last = group_size(groups - 1);
  if (last != G) offsets(last, offs_last);

  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* resp = has_res ? residual.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();

  // The prepared planes of group gr: in place, or copied into `buf`.
  auto planes = [&](int64_t gr, float* buf, int64_t c_begin, int64_t c_end) -> const float* {
    const int64_t n0 = gr * G;
    if (in_place) return xp + n0 * g.xsN - (pad * Wp + pad);
    prepare_group(xp + n0 * g.xsN, group_size(gr), buf, g, used, c_begin, c_end);
    return buf;
  };
  auto compute = [&](int64_t gr, const float* prep, int64_t o_begin, int64_t o_end) {
    const int64_t gs = group_size(gr), n0 = gr * G;
    const int64_t* of = gs == G ? offs_full.data() : offs_last.data();
    conv_group(prep, gs, g, rp, of, vp, bp, resp ? resp + n0 * g.rsN : nullptr,
               op + n0 * g.osN, relu, o_begin, o_end);
  };

  // Little work (batch 1 on small or very sparse layers: a few microseconds): the calling
  // thread does it all; waking the pool would cost more than it saves.
  const bool serial = threads == 1 || N * (nnz + O) * g.Ho * g.Wq < (int64_t{1} << 17);
  if (serial) {
    thread_local std::vector<float> buf;
    if (!in_place && static_cast<int64_t>(buf.size()) < per_group) buf.resize(per_group);
    for (int64_t gr = 0; gr < groups; ++gr) compute(gr, planes(gr, buf.data(), 0, g.C), 0, O);
  } else if (groups >= 2 * threads) {
    // Many groups: one task per group, its planes prepared in a per-thread buffer that
    // stays in cache while every output channel reads it.
    at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
      thread_local std::vector<float> buf;
      if (!in_place && static_cast<int64_t>(buf.size()) < per_group) buf.resize(per_group);
      for (int64_t gr = b; gr < e; ++gr) compute(gr, planes(gr, buf.data(), 0, g.C), 0, O);
    });
  } else {
    // Few images (batch 1): prepare each group once (channels split), then split the
    // output channels between the threads.
    thread_local std::vector<float> buf;
    if (!in_place && static_cast<int64_t>(buf.size()) < groups * per_group)
      buf.resize(groups * per_group);
    float* pp = buf.data();  // not `buf` inside the tasks: thread_local, other threads' own
    for (int64_t gr = 0; gr < groups; ++gr) {
      float* dst = pp + gr * per_group;
      const float* prep = in_place ? planes(gr, nullptr, 0, 0) : dst;
      if (!in_place)
        at::parallel_for(0, g.C, 1, [&](int64_t b, int64_t e) { planes(gr, dst, b, e); });
      at::parallel_for(0, O, 1, [&](int64_t b, int64_t e) { compute(gr, prep, b, e); });
    }
  }
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
  m.def("sparse_conv2d", &sparse_conv2d, "direct sparse convolution (CSR weights), float32",
        py::arg("x"), py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("bias"),
        py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("pad"), py::arg("residual"),
        py::arg("relu"), py::arg("out"), py::arg("x_padded") = false);
  m.def("sparse_linear", &sparse_linear, "CSR x dense linear, float32");
  m.def("has_avx512", &has_avx512, "compiled with AVX-512 intrinsics");
}
