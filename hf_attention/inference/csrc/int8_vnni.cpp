// The int8 matrix products of a decoding step, as torch operations torch.compile captures
// (see hf_attention/inference/int8_vnni.py). Each input row is quantised to int8 (symmetric, its own scale):
// - torch.ops.hf_attention.int8_vnni_matmul(rows, weight, weight_scale, weight_sums): bf16 rows, AVX512-VNNI's 4-way
//   int8 dot products (vpdpbusd), which read the weights faster than torch's _weight_int8pack_mm (which converts every
//   weight to float first);
// - torch.ops.hf_attention.int8_avx2_matmul(rows, weight, weight_scale, weight_sums): float32 rows (no bf16, which
//   AVX2 CPUs emulate), quantised to 7 bits and multiplied with vpmaddubsw, as fbgemm does on AVX2, two input rows
//   at a time so that each loaded weight serves both.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

float bf16_to_float(uint16_t bits) {
    uint32_t widened = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &widened, sizeof(value));
    return value;
}

// out (M x N) = quantised(rows (M x K, bf16)) @ weight (N x K, int8).T * row scales * weight_scale (N).
// VNNI multiplies unsigned by signed bytes: the rows' steps in [-127, 127] are shifted into [1, 255], and
// 128 * weight_sums (each weight row's sum) takes the shift back out.
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void int8_vnni_kernel(const uint16_t* rows, const int8_t* weight, const float* weight_scale, const int32_t* weight_sums,
                      float* out, int64_t m_size, int64_t n_size, int64_t k_size) {
    std::vector<uint8_t> quantized(m_size * k_size);
    std::vector<float> row_scale(m_size);
    for (int64_t m = 0; m < m_size; ++m) {
        const uint16_t* row = rows + m * k_size;
        float largest = 0.f;
        for (int64_t k = 0; k < k_size; ++k) largest = std::max(largest, std::fabs(bf16_to_float(row[k])));
        const float scale = largest > 0.f ? largest / 127.f : 1.f, inverse = 1.f / scale;
        for (int64_t k = 0; k < k_size; ++k) {
            const int step = static_cast<int>(std::nearbyint(bf16_to_float(row[k]) * inverse));
            quantized[m * k_size + k] = static_cast<uint8_t>(std::clamp(step, -127, 127) + 128);
        }
        row_scale[m] = scale;
    }
    const uint8_t* x = quantized.data();
    const float* scales = row_scale.data();
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < (n_size + 3) / 4; ++block) {
        // Four weight rows at a time: four independent sums keep the loads in flight.
        const int8_t* w[4];
        for (int r = 0; r < 4; ++r) w[r] = weight + std::min(block * 4 + r, n_size - 1) * k_size;
        for (int64_t m = 0; m < m_size; ++m) {
            __m512i total[4];
            for (int r = 0; r < 4; ++r) total[r] = _mm512_setzero_si512();
            for (int64_t k = 0; k < k_size; k += 64) {
                const __mmask64 mask = k_size - k >= 64 ? ~0ULL : (1ULL << (k_size - k)) - 1;
                const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + m * k_size + k);
                for (int r = 0; r < 4; ++r)
                    total[r] = _mm512_dpbusd_epi32(total[r], xv, _mm512_maskz_loadu_epi8(mask, w[r] + k));
            }
            for (int r = 0; r < 4 && block * 4 + r < n_size; ++r) {
                const int64_t n = block * 4 + r;
                const int32_t product = _mm512_reduce_add_epi32(total[r]) - 128 * weight_sums[n];
                out[m * n_size + n] = static_cast<float>(product) * scales[m] * weight_scale[n];
            }
        }
    }
}

// out (M x N) = quantised(rows (M x K, float32)) @ weight (N x K, int8).T * row scales * weight_scale (N), with AVX2.
// vpmaddubsw multiplies unsigned by signed bytes and adds pairs in 16 bits, saturating: rows are quantised to 7 bits,
// steps in [-63, 63] shifted into [1, 127] (|pair| <= 2 * 127 * 127 < 2^15, as fbgemm's reduce_range on AVX2), and
// 64 * weight_sums takes the shift back out. A row holding NaN or infinity gives NaN outputs, not finite garbage.
__attribute__((target("avx2,fma")))
void int8_avx2_kernel(const float* rows, const int8_t* weight, const float* weight_scale, const int32_t* weight_sums,
                      float* out, int64_t m_size, int64_t n_size, int64_t k_size) {
    const int64_t k_padded = (k_size + 31) / 32 * 32;
    std::vector<uint8_t> quantized(m_size * k_padded, 0);  // zero tail: no product there
    std::vector<float> row_scale(m_size);
    for (int64_t m = 0; m < m_size; ++m) {
        const float* row = rows + m * k_size;
        float largest = 0.f;
        bool finite = true;
        for (int64_t k = 0; k < k_size; ++k) {
            finite = finite && std::isfinite(row[k]);
            largest = std::max(largest, std::fabs(row[k]));
        }
        if (!finite) {  // the NaN scale carries into every output of the row
            row_scale[m] = std::numeric_limits<float>::quiet_NaN();
            continue;
        }
        const float scale = largest > 0.f ? largest / 63.f : 1.f, inverse = 1.f / scale;
        for (int64_t k = 0; k < k_size; ++k) {
            const int step = static_cast<int>(std::nearbyint(row[k] * inverse));
            quantized[m * k_padded + k] = static_cast<uint8_t>(std::clamp(step, -63, 63) + 64);
        }
        row_scale[m] = scale;
    }
    const int64_t k_full = k_size / 32 * 32;
    const uint8_t* x = quantized.data();
    const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < (n_size + 3) / 4; ++block) {
        // Four weight rows and two input rows at a time: each loaded weight serves both rows.
        const int8_t* w[4];
        for (int r = 0; r < 4; ++r) w[r] = weight + std::min(block * 4 + r, n_size - 1) * k_size;
        alignas(32) int8_t tail[4][32];
        for (int r = 0; r < 4; ++r) {
            std::memset(tail[r], 0, 32);
            std::memcpy(tail[r], w[r] + k_full, k_size - k_full);
        }
        for (int64_t m = 0; m < m_size; m += 2) {
            const bool pair = m + 1 < m_size;
            const uint8_t* x0 = x + m * k_padded;
            const uint8_t* x1 = pair ? x0 + k_padded : x0;
            __m256i total[2][4];
            for (int i = 0; i < 2; ++i)
                for (int r = 0; r < 4; ++r) total[i][r] = _mm256_setzero_si256();
            for (int64_t k = 0; k < k_padded; k += 32) {
                const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + k));
                const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1 + k));
                for (int r = 0; r < 4; ++r) {
                    const int8_t* source = k < k_full ? w[r] + k : tail[r];
                    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
                    total[0][r] = _mm256_add_epi32(total[0][r], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, wv), ones));
                    total[1][r] = _mm256_add_epi32(total[1][r], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, wv), ones));
                }
            }
            for (int i = 0; i < (pair ? 2 : 1); ++i) {
                for (int r = 0; r < 4 && block * 4 + r < n_size; ++r) {
                    const __m128i folded = _mm_add_epi32(_mm256_castsi256_si128(total[i][r]),
                                                         _mm256_extracti128_si256(total[i][r], 1));
                    const __m128i pairs = _mm_add_epi32(folded, _mm_shuffle_epi32(folded, 0x4e));
                    const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(pairs, _mm_shuffle_epi32(pairs, 0xb1)));
                    const int64_t n = block * 4 + r;
                    const int32_t product = sum - 64 * weight_sums[n];
                    out[(m + i) * n_size + n] = static_cast<float>(product) * row_scale[m + i] * weight_scale[n];
                }
            }
        }
    }
}

// The checks both operations make before reading any memory: shapes, dtypes, one scale and one sum per weight row,
// and K small enough that a row's integer sum fits in int32 (`max_k`: each input adds at most 255 * 127 with VNNI's
// shifted bytes, 127 * 127 with AVX2's shifted 7-bit steps).
void check_operands(const char* name, const at::Tensor& rows, at::ScalarType row_type, const char* row_type_name,
                    const at::Tensor& weight, const at::Tensor& weight_scale, const at::Tensor& weight_sums,
                    int64_t max_k) {
    TORCH_CHECK(rows.dim() == 2 && weight.dim() == 2 && rows.size(1) == weight.size(1), name,
                ": rows (M, K) and weight (N, K), not ", rows.sizes(), " and ", weight.sizes());
    TORCH_CHECK(rows.scalar_type() == row_type && weight.scalar_type() == at::kChar &&
                    weight_scale.scalar_type() == at::kFloat && weight_sums.scalar_type() == at::kInt,
                name, ": ", row_type_name, " rows, int8 weight, float32 weight_scale, int32 weight_sums");
    TORCH_CHECK(weight_scale.numel() == weight.size(0) && weight_sums.numel() == weight.size(0), name,
                ": weight_scale and weight_sums need one value per weight row (", weight.size(0), ")");
    TORCH_CHECK(weight.size(1) <= max_k, name, ": K = ", weight.size(1), " could overflow the 32-bit sums (at most ",
                max_k, ")");
}

at::Tensor int8_vnni_matmul(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const at::Tensor& weight_sums) {
    check_operands("int8_vnni_matmul", rows, at::kBFloat16, "bf16", weight, weight_scale, weight_sums,
                   (int64_t{1} << 16) - 1);
    const at::Tensor x = rows.contiguous(), w = weight.contiguous();
    const at::Tensor scale = weight_scale.contiguous(), sums = weight_sums.contiguous();
    at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
    int8_vnni_kernel(reinterpret_cast<const uint16_t*>(x.data_ptr()), w.data_ptr<int8_t>(), scale.data_ptr<float>(),
                     sums.data_ptr<int32_t>(), out.data_ptr<float>(), x.size(0), w.size(0), x.size(1));
    return out;
}

at::Tensor int8_avx2_matmul(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const at::Tensor& weight_sums) {
    check_operands("int8_avx2_matmul", rows, at::kFloat, "float32", weight, weight_scale, weight_sums,
                   (int64_t{1} << 17) - 1);
    const at::Tensor x = rows.contiguous(), w = weight.contiguous();
    const at::Tensor scale = weight_scale.contiguous(), sums = weight_sums.contiguous();
    at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
    int8_avx2_kernel(x.data_ptr<float>(), w.data_ptr<int8_t>(), scale.data_ptr<float>(), sums.data_ptr<int32_t>(),
                     out.data_ptr<float>(), x.size(0), w.size(0), x.size(1));
    return out;
}

}  // namespace

TORCH_LIBRARY(hf_attention, m) {
    m.def("int8_vnni_matmul(Tensor rows, Tensor weight, Tensor weight_scale, Tensor weight_sums) -> Tensor");
    m.def("int8_avx2_matmul(Tensor rows, Tensor weight, Tensor weight_scale, Tensor weight_sums) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_attention, CPU, m) {
    m.impl("int8_vnni_matmul", &int8_vnni_matmul);
    m.impl("int8_avx2_matmul", &int8_avx2_matmul);
}
