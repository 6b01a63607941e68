/* Decode attention over ragged per-request bf16 KV, one call per decoder layer.
 *
 * Built and loaded by semshare_core/decode_kernel.py (gcc -O3 -march=native, at first use,
 * cached per source and CPU), used by semshare_core/batch.py for bf16 decode steps on x86
 * CPUs with AVX512-BF16. Per request and KV head: scores q.k for the G query heads of the
 * group (dot products of bf16 pairs accumulated in fp32, VDPBF16PS), an fp32 softmax, and
 * the values' weighted sum in fp32, rounded to bf16 once at the end. Each K and V row is
 * read once per step and group (GQA without repeating the KV).
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <stdlib.h>
#include <immintrin.h>

#define MAXG 16

static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f), hi = _mm512_set1_ps(88.0f);
    x = _mm512_max_ps(_mm512_min_ps(x, hi), lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}


/* lane m of the result = the sum of the 16 lanes of v[m] */
static inline __m512 reduce16(const __m512 *v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++) {
        __m512 lo = _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 hi = _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2));
        t[i] = _mm512_add_ps(lo, hi);
    }
    for (int i = 0; i < 4; i++) {
        __m512 lo = _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0));
        __m512 hi = _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1));
        u[i] = _mm512_add_ps(lo, hi);
    }
    __m512 p = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    __m512 q = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    __m512 r = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(p), _mm512_castps_pd(q))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(p), _mm512_castps_pd(q))));
    /* r: block k, lane i holds v[4 i + k]; put v[m] at lane m */
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(idx, r);
}

static inline uint16_t f2bf(float f) {
    union { uint32_t u; float f; } x; x.f = f;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40);
    x.u += 0x7fffu + ((x.u >> 16) & 1u);
    return (uint16_t)(x.u >> 16);
}

/* One (request, kv head): G query heads over n rows. G and D are compile-time constants
   at every call site (see the dispatch below), so the loops unroll into registers. */
static inline __attribute__((always_inline)) void head_attn(
        const uint16_t *qh, uint16_t *oh, const uint16_t *K, const uint16_t *V, int64_t n,
        float scale, float *sc, int64_t stride_g, const int G, const int D) {
    const int NP = D / 32, NC = D / 16;
    __m512bh qv[MAXG][8];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < NP; c++) qv[g][c] = (__m512bh)_mm512_loadu_si512(qh + g * D + c * 32);
    for (int g = 0; g < G; g++) {
        float *row = sc + g * stride_g;
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 a[16];
            for (int r = 0; r < 16; r++) {
                const uint16_t *kr = K + (j + r) * D;
                __m512 s = _mm512_setzero_ps();
                for (int c = 0; c < NP; c++) s = _mm512_dpbf16_ps(s, qv[g][c], (__m512bh)_mm512_loadu_si512(kr + c * 32));
                a[r] = s;
            }
            _mm512_storeu_ps(row + j, reduce16(a));
        }
        for (; j < n; j++) {
            const uint16_t *kr = K + j * D;
            __m512 s = _mm512_setzero_ps();
            for (int c = 0; c < NP; c++) s = _mm512_dpbf16_ps(s, qv[g][c], (__m512bh)_mm512_loadu_si512(kr + c * 32));
            row[j] = _mm512_reduce_add_ps(s);
        }
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    float inv[MAXG];
    for (int g = 0; g < G; g++) {
        float *row = sc + g * stride_g;
        __m512 m = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + j));
        float mx = _mm512_reduce_max_ps(m);
        for (; j < n; j++) if (row[j] > mx) mx = row[j];
        const __m512 vm = _mm512_set1_ps(mx * scale);
        __m512 s = _mm512_setzero_ps();
        for (j = 0; j < n; j += 16) {
            __mmask16 k = (n - j >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            __m512 x = _mm512_maskz_loadu_ps(k, row + j);
            __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_fmsub_ps(x, vscale, vm)));
            _mm512_mask_storeu_ps(row + j, k, e);
            s = _mm512_add_ps(s, e);
        }
        inv[g] = 1.0f / _mm512_reduce_add_ps(s);
    }
    __m512 acc[MAXG][16];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < NC; c++) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *vr = V + j * D;
        __m512 vf[16];
        for (int c = 0; c < NC; c++) vf[c] = bf16x16_to_f32(vr + c * 16);
        for (int g = 0; g < G; g++) {
            const __m512 p = _mm512_set1_ps(sc[g * stride_g + j]);
            for (int c = 0; c < NC; c++) acc[g][c] = _mm512_fmadd_ps(p, vf[c], acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++) {
        uint16_t *o = oh + g * D;
        const __m512 vi = _mm512_set1_ps(inv[g]);
        float tmp[16] __attribute__((aligned(64)));
        for (int c = 0; c < NC; c++) {
            _mm512_store_ps(tmp, _mm512_mul_ps(acc[g][c], vi));
            for (int d = 0; d < 16; d++) o[c * 16 + d] = f2bf(tmp[d]);
        }
    }
}

#define CASE(GG, DD) case (GG) * 1000 + (DD): head_attn(qh, oh, K, V, n, scale, sc, stride_g, GG, DD); break;

/* q, out: [B, Hq, D] bf16 contiguous. Request b's keys/values start at kp[b] / vp[b], laid out
   [Hkv, cap[b], D]; it attends rows [start[b], len[b]). D in {64, 128}, Hq / Hkv <= 8.
   newk / newv (may be NULL): the step's new K / V rows, written to row len[b] - 1 of each
   request's buffers before it attends; element (b, h, d) at b * ns[0] + h * ns[1] + d for K,
   b * ns[2] + h * ns[3] + d for V. Returns 0, or -1 for a shape it does not handle (nothing
   written), -2 out of memory (nothing written). */
int semshare_decode_attn(const uint16_t *q, uint16_t *out, const int64_t *kp, const int64_t *vp,
                         const int64_t *cap, const int64_t *start, const int64_t *len,
                         int B, int Hq, int Hkv, int D, float scale,
                         const uint16_t *newk, const uint16_t *newv, const int64_t *ns) {
    if ((D != 64 && D != 128) || Hkv <= 0 || Hq % Hkv || Hq / Hkv > 8) return -1;
    const int G = Hq / Hkv;
    int64_t maxn = 1;
    for (int b = 0; b < B; b++) if (len[b] - start[b] > maxn) maxn = len[b] - start[b];
    const int64_t stride_g = (maxn + 15) & ~(int64_t)15;
    float *sc = (float *)aligned_alloc(64, sizeof(float) * (size_t)G * (size_t)stride_g);
    if (!sc) return -2;
    for (int b = 0; b < B; b++) {
        const int64_t n = len[b] - start[b];
        if (newk && newv && len[b] > 0) {
            for (int h = 0; h < Hkv; h++) {
                const int64_t row = ((int64_t)h * cap[b] + len[b] - 1) * D;
                memcpy((uint16_t *)(intptr_t)kp[b] + row, newk + b * ns[0] + h * ns[1], sizeof(uint16_t) * D);
                memcpy((uint16_t *)(intptr_t)vp[b] + row, newv + b * ns[2] + h * ns[3], sizeof(uint16_t) * D);
            }
        }
        for (int h = 0; h < Hkv; h++) {
            const uint16_t *qh = q + ((int64_t)b * Hq + (int64_t)h * G) * D;
            uint16_t *oh = out + ((int64_t)b * Hq + (int64_t)h * G) * D;
            if (n <= 0) { memset(oh, 0, sizeof(uint16_t) * G * D); continue; }
            const uint16_t *K = (const uint16_t *)(intptr_t)kp[b] + ((int64_t)h * cap[b] + start[b]) * D;
            const uint16_t *V = (const uint16_t *)(intptr_t)vp[b] + ((int64_t)h * cap[b] + start[b]) * D;
            switch (G * 1000 + D) {
                CASE(1, 64) CASE(2, 64) CASE(3, 64) CASE(4, 64) CASE(5, 64) CASE(6, 64) CASE(7, 64) CASE(8, 64)
                CASE(1, 128) CASE(2, 128) CASE(3, 128) CASE(4, 128) CASE(5, 128) CASE(6, 128) CASE(7, 128) CASE(8, 128)
            }
        }
    }
    free(sc);
    return 0;
}

/* The calling convention above; decode_kernel.py checks it before using the library. */
int semshare_decode_attn_abi(void) { return 2; }
