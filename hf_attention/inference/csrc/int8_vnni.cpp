// torch.ops.hf_attention.int8_vnni_matmul(rows, weight, weight_scale, weight_sums): the matrix product of a decoding
// step with int8 weights on CPUs with AVX512-VNNI. Each input row is quantised to int8 (symmetric, its own scale) and
// multiplied with VNNI's 4-way int8 dot products (vpdpbusd), which read the weights faster than torch's
// _weight_int8pack_mm (which converts every weight to float first). See hf_attention/inference/int8_vnni.py.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

at::Tensor int8_vnni_matmul(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& weight_scale,
                            const at::Tensor& weight_sums) {
    TORCH_CHECK(rows.dim() == 2 && weight.dim() == 2 && rows.size(1) == weight.size(1),
                "int8_vnni_matmul: rows (M, K) and weight (N, K), not ", rows.sizes(), " and ", weight.sizes());
    TORCH_CHECK(rows.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kChar &&
                    weight_scale.scalar_type() == at::kFloat && weight_sums.scalar_type() == at::kInt,
                "int8_vnni_matmul: bf16 rows, int8 weight, float32 weight_scale, int32 weight_sums");
    const at::Tensor x = rows.contiguous(), w = weight.contiguous();
    const at::Tensor scale = weight_scale.contiguous(), sums = weight_sums.contiguous();
    at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
    int8_vnni_kernel(reinterpret_cast<const uint16_t*>(x.data_ptr()), w.data_ptr<int8_t>(), scale.data_ptr<float>(),
                     sums.data_ptr<int32_t>(), out.data_ptr<float>(), x.size(0), w.size(0), x.size(1));
    return out;
}

}  // namespace

TORCH_LIBRARY(hf_attention, m) {
    m.def("int8_vnni_matmul(Tensor rows, Tensor weight, Tensor weight_scale, Tensor weight_sums) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_attention, CPU, m) { m.impl("int8_vnni_matmul", &int8_vnni_matmul); }
