// The CPU ceilings behind "Sparse inference (issue 11)" in RESULTS.md: how many 512-bit FMAs
// per second one core retires (a) from registers only, (b) when every FMA also loads its own
// 64-byte vector from L1 (what a direct sparse convolution does: one load per nonzero weight
// and output pixel vector), (c) when 16 FMAs share 2 loads.
//
//   gcc -O2 -march=native benchmarks/fma_load_peak.c -o /tmp/fma_load_peak && /tmp/fma_load_peak
//
// Needs AVX-512F. Prints G FMA instructions per second (16 float lanes each) per core.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static float buf[4096] __attribute__((aligned(64)));

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float sum(const __m512* a, int n) {
  float r = 0.f;
  for (int i = 0; i < n; ++i) r += _mm512_reduce_add_ps(a[i]);
  return r;
}

int main(void) {
  const long n = 50000000;
  for (int i = 0; i < 4096; ++i) buf[i] = 1e-3f * (i % 7);
  const __m512 w = _mm512_set1_ps(0.5f), c = _mm512_set1_ps(1e-7f);
  __m512 a[16];
  double t;

  // (a) registers only: 12 independent chains hide the 4-cycle FMA latency
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(1.f);
  t = seconds();
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], w, c);
  }
  t = seconds() - t;
  printf("registers only:        %.2f G FMA/s  (check %g)\n", n * 12.0 / t / 1e9, sum(a, 12));

  // (b) one aligned 64-byte L1 load per FMA (16 accumulators)
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  t = seconds();
  for (long k = 0; k < n; ++k) {
    const float* q = buf + ((k & 7) << 6);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(w, _mm512_load_ps(q + 16 * i), a[i]);
  }
  t = seconds() - t;
  printf("one load per FMA:      %.2f G FMA/s  (check %g)\n", n * 16.0 / t / 1e9, sum(a, 16));

  // (c) two loads shared by 16 FMAs
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  t = seconds();
  for (long k = 0; k < n; ++k) {
    const float* q = buf + ((k & 7) << 6);
    const __m512 x0 = _mm512_load_ps(q), x1 = _mm512_load_ps(q + 16);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps((i & 1) ? x1 : x0, w, a[i]);
  }
  t = seconds() - t;
  printf("2 loads per 16 FMAs:   %.2f G FMA/s  (check %g)\n", n * 16.0 / t / 1e9, sum(a, 16));
  return 0;
}
