/* Gather reused bf16 KV rows from one or more cached prompts into prompt order and
 * re-rotate each key to its new position, in one pass.
 *
 * Built and loaded by semshare_core/gather_kernel.py (cc -O3 -march=native
 * -ffp-contract=off, at first use, cached per source and CPU), used by the engine's
 * host gather of a hit on a CPU (bf16 KV, half-split RoPE: Llama, Mistral, Qwen2).
 *
 * out    : bf16 [L, 2, H, n, D], contiguous; layers [from_layer, L) are written.
 * srcs   : per source, bf16 [L, 2, H, src_len[k], D], contiguous.
 * row_src: int32 [n], the source of prompt row i, or -1 (row left zero: recomputed).
 * row_pos: int64 [n], its position in that source.
 * cs, sn : float32 [n, D/2], cos / sin of the row's rotation (prompt position - source
 *          position), the first half of the model's duplicated [n, D] angles.
 *
 * Keys: x1 = k[:D/2], x2 = k[D/2:] in float32, then x1*c - x2*s and x2*c + x1*s, each
 * product rounded to float32 before the add (no FMA: -ffp-contract=off), rounded to bf16
 * to nearest even: the same bits as the float32 torch path it replaces
 * (semshare_core.rope._rotate_half_inplace then a copy to bf16). Values are copied.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define SEMSHARE_GATHER_ABI 1

int semshare_gather_rotate_abi(void) { return SEMSHARE_GATHER_ABI; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                       /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#define MAXHALF 256

int semshare_gather_rotate(uint16_t *out, const uint16_t *const *srcs, const int64_t *src_len, int nsrc,
                           const int32_t *row_src, const int64_t *row_pos, const float *cs, const float *sn,
                           int L, int from_layer, int H, int64_t n, int D) {
    if (D <= 0 || D % 2 != 0 || D / 2 > MAXHALF || L <= 0 || H <= 0 || n < 0 || from_layer < 0 || from_layer > L)
        return 1;
    for (int64_t i = 0; i < n; i++) {
        int k = row_src[i];
        if (k >= nsrc || (k >= 0 && (row_pos[i] < 0 || row_pos[i] >= src_len[k]))) return 2;
    }
    const int h2 = D / 2;
    const size_t row = (size_t)D;
    for (int l = from_layer; l < L; l++) {
        for (int slot = 0; slot < 2; slot++) {
            for (int h = 0; h < H; h++) {
                uint16_t *dst = out + ((((size_t)l * 2 + slot) * H + h) * (size_t)n) * row;
                for (int64_t i = 0; i < n; i++, dst += row) {
                    int k = row_src[i];
                    if (k < 0) {
                        memset(dst, 0, row * sizeof(uint16_t));
                        continue;
                    }
                    const size_t m = (size_t)src_len[k];
                    const uint16_t *src = srcs[k] + ((((size_t)l * 2 + slot) * H + h) * m + (size_t)row_pos[i]) * row;
                    if (slot == 1) {
                        memcpy(dst, src, row * sizeof(uint16_t));
                        continue;
                    }
                    const float *c = cs + (size_t)i * h2, *s = sn + (size_t)i * h2;
                    float x1[MAXHALF], x2[MAXHALF];
                    for (int j = 0; j < h2; j++) {
                        x1[j] = bf16_to_f32(src[j]);
                        x2[j] = bf16_to_f32(src[h2 + j]);
                    }
                    for (int j = 0; j < h2; j++) {
                        float a = x1[j] * c[j], e = x2[j] * c[j];
                        dst[j] = f32_to_bf16(fmaf(-x2[j], s[j], a));
                        dst[h2 + j] = f32_to_bf16(fmaf(x1[j], s[j], e));
                    }
                }
            }
        }
    }
    return 0;
}
