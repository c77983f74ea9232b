// The int8 matrix products of a decoding step, as torch operations torch.compile captures
// (see hf_attention/inference/int8_vnni.py). Each input row is quantised to integer steps (symmetric, its own scale)
// and multiplied by weights packed once by `pack_weight` (int8_vnni.py): blocks of 16 output columns, and in each
// block, for every 4 consecutive inputs, 64 bytes holding those 4 inputs' weights of each of the 16 columns. One
// 32-bit lane of a vector then accumulates one column, so a tile of rows x columns stays in registers from the first
// input to the last, each loaded weight serves every row of the tile and no sum is ever reduced across lanes.
// - torch.ops.hf_attention.int8_vnni_matmul(rows, packed_weight, weight_scale, weight_sums): float32 or bf16 rows,
//   quantised to 8 bits, AVX512-VNNI's 4-way int8 dot products (vpdpbusd) into 16 columns per register;
// - torch.ops.hf_attention.int8_avx2_matmul(rows, packed_weight, weight_scale, weight_sums): float32 rows, quantised to
//   7 bits and multiplied with vpmaddubsw + vpmaddwd, as fbgemm does on AVX2, 8 columns per register.
// Both take an optional float32 bias, added to each output row as the product's last step, and `relu`, which then
// clamps the outputs at 0 (so that neither a layer's bias add nor the feed-forward network's ReLU is a pass of its own
// over the output: at 32 rows of 2048 such a pass cost more than a tenth of its product).
// A row holding NaN or infinity gives NaN outputs, not finite garbage.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kColumns = 16;  // output columns per packed block
constexpr int64_t kDepth = 4;     // inputs per 32-bit lane: a packed block holds 64 bytes per 4 inputs
constexpr int64_t kTileRows = 4;  // rows per register tile
constexpr int64_t kRowChunk = 32;  // rows per parallel task: a task's weights are read once for that many rows

// The tasks of one product: column chunks of `blocks_per_chunk` blocks times row chunks of kRowChunk rows, in an order
// that gives each thread whole column chunks (each block's weights read by one thread).
template <typename Tile>
void for_each_tile(int64_t m_size, int64_t blocks, int64_t blocks_per_chunk, const Tile& tile) {
    const int64_t column_chunks = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;
    const int64_t row_chunks = (m_size + kRowChunk - 1) / kRowChunk;
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < column_chunks * row_chunks; ++task) {
        const int64_t first_block = task / row_chunks * blocks_per_chunk;
        const int64_t end_block = std::min(first_block + blocks_per_chunk, blocks);
        const int64_t first_row = task % row_chunks * kRowChunk, end_row = std::min(first_row + kRowChunk, m_size);
        for (int64_t m = first_row; m < end_row; m += kTileRows) tile(m, std::min(kTileRows, end_row - m), first_block,
                                                                      end_block);
    }
}

// Each row quantised by `quantize_row` to bytes, padded to whole groups of kDepth inputs, with its scale.
struct QuantizedRows {
    int64_t depth_groups, k_padded;
    std::vector<uint8_t> bytes;
    std::vector<float> scales;
};

template <typename T, typename Quantize>
QuantizedRows quantize_rows(const T* rows, int64_t m_size, int64_t k_size, Quantize quantize_row) {
    QuantizedRows quantized;
    quantized.depth_groups = (k_size + kDepth - 1) / kDepth;
    quantized.k_padded = quantized.depth_groups * kDepth;
    quantized.bytes.resize(m_size * quantized.k_padded);
    quantized.scales.resize(m_size);
#pragma omp parallel for schedule(static) if (m_size >= kRowChunk)
    for (int64_t m = 0; m < m_size; ++m)
        quantized.scales[m] = quantize_row(rows + m * k_size, k_size, quantized.k_padded,
                                           quantized.bytes.data() + m * quantized.k_padded);
    return quantized;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}
inline __m512 load_floats(const float* source, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, source); }
inline __m512 load_floats(const uint16_t* bf16, __mmask16 mask) {  // bf16 is the top half of a float32
    const __m512i widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bf16));
    return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));
}

// One row as bytes round(x / scale) + 128 with scale = max|x| / 127 (1 for a zero row), padded with 128 (zero) to
// k_padded; returns the scale, NaN for a row with NaN or infinity.
template <typename T>
float quantize_row_8_bits(const T* row, int64_t k_size, int64_t k_padded, uint8_t* out) {
    const __m512 infinity = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    __m512 largest = _mm512_setzero_ps();
    __mmask16 not_finite = 0;
    for (int64_t k = 0; k < k_size; k += 16) {
        const __mmask16 mask = first_lanes(k_size - k);
        const __m512 magnitude = _mm512_abs_ps(load_floats(row + k, mask));
        not_finite |= mask & ~_mm512_cmp_ps_mask(magnitude, infinity, _CMP_LT_OQ);
        largest = _mm512_max_ps(largest, magnitude);
    }
    std::memset(out + k_size, 128, k_padded - k_size);
    if (not_finite) return std::numeric_limits<float>::quiet_NaN();
    const float top = _mm512_reduce_max_ps(largest);
    const float scale = top > 0.f ? top / 127.f : 1.f;
    const __m512 inverse = _mm512_set1_ps(1.f / scale);
    const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127), shift = _mm512_set1_epi32(128);
    for (int64_t k = 0; k < k_size; k += 16) {
        const __mmask16 mask = first_lanes(k_size - k);
        // rounded to nearest, ties to even (the default rounding mode), as torch.round
        __m512i steps = _mm512_cvtps_epi32(_mm512_mul_ps(load_floats(row + k, mask), inverse));
        steps = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(steps, low), high), shift);
        _mm_mask_storeu_epi8(out + k, mask, _mm512_cvtepi32_epi8(steps));
    }
    return scale;
}

// out[r][columns of blocks block .. block + C) for ROWS rows: ROWS x C registers of 16 sums each. VNNI multiplies
// unsigned by signed bytes: the rows' steps were shifted by 128, and 128 * weight_sums takes the shift back out.
template <int ROWS, int C>
inline void vnni_tile(const uint8_t* x, int64_t k_padded, const int8_t* packed, int64_t depth_groups, int64_t block,
                      const float* row_scale, const float* weight_scale, const int32_t* weight_sums, const float* bias,
                      bool relu, float* out, int64_t n_size) {
    __m512i total[ROWS][C];
    for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) total[r][c] = _mm512_setzero_si512();
    const int8_t* weights = packed + block * depth_groups * 64;
    for (int64_t g = 0; g < depth_groups; ++g) {
        __m512i w[C];
        for (int c = 0; c < C; ++c) w[c] = _mm512_loadu_si512(weights + (c * depth_groups + g) * 64);
        for (int r = 0; r < ROWS; ++r) {
            int32_t four;
            std::memcpy(&four, x + r * k_padded + g * kDepth, sizeof(four));
            const __m512i inputs = _mm512_set1_epi32(four);
            for (int c = 0; c < C; ++c) total[r][c] = _mm512_dpbusd_epi32(total[r][c], inputs, w[c]);
        }
    }
    for (int c = 0; c < C; ++c) {
        const int64_t n = (block + c) * kColumns;
        const __mmask16 mask = first_lanes(n_size - n);
        const __m512i shift = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, weight_sums + n), 7);
        const __m512 scale = _mm512_maskz_loadu_ps(mask, weight_scale + n);
        const __m512 added = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + n);
        for (int r = 0; r < ROWS; ++r) {  // (product * row scale) * weight scale + bias, the tests' reference's order
            const __m512 product = _mm512_cvtepi32_ps(_mm512_sub_epi32(total[r][c], shift));
            __m512 value = _mm512_mul_ps(_mm512_mul_ps(product, _mm512_set1_ps(row_scale[r])), scale);
            if (bias != nullptr) value = _mm512_add_ps(value, added);
            if (relu) value = _mm512_max_ps(_mm512_setzero_ps(), value);  // NaN stays NaN, as torch.relu's
            _mm512_mask_storeu_ps(out + r * n_size + n, mask, value);
        }
    }
}

template <int ROWS>
void vnni_rows(const uint8_t* x, int64_t k_padded, const int8_t* packed, int64_t depth_groups, int64_t first_block,
               int64_t end_block, const float* row_scale, const float* weight_scale, const int32_t* weight_sums,
               const float* bias, bool relu, float* out, int64_t n_size) {
    int64_t block = first_block;
    for (; block + 4 <= end_block; block += 4)  // 4 x 4 registers: 16 independent sums in flight
        vnni_tile<ROWS, 4>(x, k_padded, packed, depth_groups, block, row_scale, weight_scale, weight_sums, bias, relu,
                           out, n_size);
    for (; block < end_block; ++block)
        vnni_tile<ROWS, 1>(x, k_padded, packed, depth_groups, block, row_scale, weight_scale, weight_sums, bias, relu,
                           out, n_size);
}

template <typename T>
void int8_vnni_kernel(const T* rows, const int8_t* packed, const float* weight_scale, const int32_t* weight_sums,
                      const float* bias, bool relu, float* out, int64_t m_size, int64_t n_size, int64_t k_size) {
    const QuantizedRows quantized = quantize_rows(rows, m_size, k_size, quantize_row_8_bits<T>);
    const int64_t depth_groups = quantized.depth_groups, k_padded = quantized.k_padded;
    const int64_t blocks = (n_size + kColumns - 1) / kColumns;
    for_each_tile(m_size, blocks, 4, [&](int64_t m, int64_t rows_here, int64_t first_block, int64_t end_block) {
        const uint8_t* x = quantized.bytes.data() + m * k_padded;
        const float* scales = quantized.scales.data() + m;
        float* o = out + m * n_size;
        switch (rows_here) {
            case 4: vnni_rows<4>(x, k_padded, packed, depth_groups, first_block, end_block, scales, weight_scale, weight_sums, bias, relu, o, n_size); break;
            case 3: vnni_rows<3>(x, k_padded, packed, depth_groups, first_block, end_block, scales, weight_scale, weight_sums, bias, relu, o, n_size); break;
            case 2: vnni_rows<2>(x, k_padded, packed, depth_groups, first_block, end_block, scales, weight_scale, weight_sums, bias, relu, o, n_size); break;
            default: vnni_rows<1>(x, k_padded, packed, depth_groups, first_block, end_block, scales, weight_scale, weight_sums, bias, relu, o, n_size);
        }
    });
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// One row as bytes round(x / scale) + 64 with scale = max|x| / 63, padded with 64 (zero): vpmaddubsw adds pairs of
// products in 16 bits, saturating, and 2 * 127 * 127 < 2^15 only with 7-bit steps (fbgemm's reduce_range on AVX2).
float quantize_row_7_bits(const float* row, int64_t k_size, int64_t k_padded, uint8_t* out) {
    const __m256 sign = _mm256_set1_ps(-0.f), infinity = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    const int64_t k_full = k_size / 8 * 8;
    __m256 largest = _mm256_setzero_ps();
    int not_finite = 0;
    for (int64_t k = 0; k < k_full; k += 8) {
        const __m256 magnitude = _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k));
        not_finite |= ~_mm256_movemask_ps(_mm256_cmp_ps(magnitude, infinity, _CMP_LT_OQ)) & 0xFF;
        largest = _mm256_max_ps(largest, magnitude);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, largest);
    float top = *std::max_element(lanes, lanes + 8);
    for (int64_t k = k_full; k < k_size; ++k) {
        not_finite |= !std::isfinite(row[k]);
        top = std::max(top, std::fabs(row[k]));
    }
    std::memset(out + k_size, 64, k_padded - k_size);
    if (not_finite) return std::numeric_limits<float>::quiet_NaN();
    const float scale = top > 0.f ? top / 63.f : 1.f, inverse = 1.f / scale;
    const __m256 inverses = _mm256_set1_ps(inverse);
    const __m256i low = _mm256_set1_epi32(-63), high = _mm256_set1_epi32(63), shift = _mm256_set1_epi32(64);
    for (int64_t k = 0; k < k_full; k += 8) {
        __m256i steps = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), inverses));
        steps = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(steps, low), high), shift);
        // packs work within 128-bit halves: bytes 0-3 of each half are steps 0-3 and 4-7
        const __m256i words = _mm256_packus_epi32(steps, steps), bytes = _mm256_packus_epi16(words, words);
        const int32_t first = _mm256_cvtsi256_si32(bytes), second = _mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1));
        std::memcpy(out + k, &first, 4);
        std::memcpy(out + k + 4, &second, 4);
    }
    for (int64_t k = k_full; k < k_size; ++k) {
        const int step = static_cast<int>(std::nearbyint(row[k] * inverse));
        out[k] = static_cast<uint8_t>(std::clamp(step, -63, 63) + 64);
    }
    return scale;
}

// out[r][one block's 16 columns] for ROWS rows: two registers of 8 sums per row.
template <int ROWS>
inline void avx2_tile(const uint8_t* x, int64_t k_padded, const int8_t* packed, int64_t depth_groups, int64_t block,
                      const float* row_scale, const float* weight_scale, const int32_t* weight_sums, const float* bias,
                      bool relu, float* out, int64_t n_size) {
    __m256i total[ROWS][2];
    for (int r = 0; r < ROWS; ++r) total[r][0] = total[r][1] = _mm256_setzero_si256();
    const int8_t* weights = packed + block * depth_groups * 64;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < depth_groups; ++g) {
        const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + g * 64));
        const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + g * 64 + 32));
        for (int r = 0; r < ROWS; ++r) {
            int32_t four;
            std::memcpy(&four, x + r * k_padded + g * kDepth, sizeof(four));
            const __m256i inputs = _mm256_set1_epi32(four);
            total[r][0] = _mm256_add_epi32(total[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(inputs, low), ones));
            total[r][1] = _mm256_add_epi32(total[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(inputs, high), ones));
        }
    }
    const int64_t n = block * kColumns, valid = std::min(kColumns, n_size - n);
    alignas(32) int32_t sums[kColumns] = {0};
    alignas(32) float scales[kColumns] = {0}, added[kColumns] = {0}, values[kColumns];
    std::memcpy(sums, weight_sums + n, valid * sizeof(int32_t));
    std::memcpy(scales, weight_scale + n, valid * sizeof(float));
    if (bias != nullptr) std::memcpy(added, bias + n, valid * sizeof(float));
    for (int r = 0; r < ROWS; ++r) {
        for (int half = 0; half < 2; ++half) {  // 64 * weight_sums takes the rows' shift by 64 back out
            const __m256i shift = _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(sums + 8 * half)), 6);
            const __m256 product = _mm256_cvtepi32_ps(_mm256_sub_epi32(total[r][half], shift));
            const __m256 scaled = _mm256_mul_ps(product, _mm256_set1_ps(row_scale[r]));
            __m256 value = _mm256_mul_ps(scaled, _mm256_load_ps(scales + 8 * half));
            if (bias != nullptr) value = _mm256_add_ps(value, _mm256_load_ps(added + 8 * half));
            if (relu) value = _mm256_max_ps(_mm256_setzero_ps(), value);  // NaN stays NaN, as torch.relu's
            _mm256_store_ps(values + 8 * half, value);
        }
        std::memcpy(out + r * n_size + n, values, valid * sizeof(float));
    }
}

void int8_avx2_kernel(const float* rows, const int8_t* packed, const float* weight_scale, const int32_t* weight_sums,
                      const float* bias, bool relu, float* out, int64_t m_size, int64_t n_size, int64_t k_size) {
    const QuantizedRows quantized = quantize_rows(rows, m_size, k_size, quantize_row_7_bits);
    const int64_t depth_groups = quantized.depth_groups, k_padded = quantized.k_padded;
    const int64_t blocks = (n_size + kColumns - 1) / kColumns;
    for_each_tile(m_size, blocks, 1, [&](int64_t m, int64_t rows_here, int64_t block, int64_t) {
        const uint8_t* x = quantized.bytes.data() + m * k_padded;
        const float* scales = quantized.scales.data() + m;
        float* o = out + m * n_size;
        switch (rows_here) {
            case 4: avx2_tile<4>(x, k_padded, packed, depth_groups, block, scales, weight_scale, weight_sums, bias, relu, o, n_size); break;
            case 3: avx2_tile<3>(x, k_padded, packed, depth_groups, block, scales, weight_scale, weight_sums, bias, relu, o, n_size); break;
            case 2: avx2_tile<2>(x, k_padded, packed, depth_groups, block, scales, weight_scale, weight_sums, bias, relu, o, n_size); break;
            default: avx2_tile<1>(x, k_padded, packed, depth_groups, block, scales, weight_scale, weight_sums, bias, relu, o, n_size);
        }
    });
}

#pragma GCC pop_options

// The checks both operations make before reading any memory: shapes, dtypes, one scale and one sum per output, a
// packed weight of the shape `pack_weight` gives for N outputs and K inputs, and K small enough that a row's integer
// sum fits in int32 (`max_k`: each input adds at most 255 * 127 with VNNI's shifted bytes, 127 * 127 with AVX2's
// shifted 7-bit steps).
void check_operands(const char* name, const at::Tensor& rows, bool bf16_allowed, const at::Tensor& packed,
                    const at::Tensor& weight_scale, const at::Tensor& weight_sums, int64_t max_k) {
    const bool row_type = rows.scalar_type() == at::kFloat || (bf16_allowed && rows.scalar_type() == at::kBFloat16);
    TORCH_CHECK(row_type && packed.scalar_type() == at::kChar && weight_scale.scalar_type() == at::kFloat &&
                    weight_sums.scalar_type() == at::kInt,
                name, ": ", bf16_allowed ? "float32 or bf16" : "float32",
                " rows, int8 packed_weight, float32 weight_scale, int32 weight_sums");
    const int64_t n_size = weight_scale.numel();
    TORCH_CHECK(weight_sums.numel() == n_size, name, ": weight_scale and weight_sums need one value per output (",
                n_size, " and ", weight_sums.numel(), ")");
    TORCH_CHECK(rows.dim() == 2, name, ": rows (M, K), not ", rows.sizes());
    const int64_t k_size = rows.size(1);
    TORCH_CHECK(packed.dim() == 3 && packed.size(0) == (n_size + kColumns - 1) / kColumns &&
                    packed.size(1) == (k_size + kDepth - 1) / kDepth && packed.size(2) == kColumns * kDepth,
                name, ": packed_weight ", packed.sizes(), " is not pack_weight's layout for ", n_size, " outputs of ",
                k_size, " inputs");
    TORCH_CHECK(k_size <= max_k, name, ": K = ", k_size, " could overflow the 32-bit sums (at most ", max_k, ")");
}

// The bias as the kernels read it: float32, one per output, contiguous; nullptr without one.
const float* bias_data(const char* name, const std::optional<at::Tensor>& bias, int64_t n_size, at::Tensor& kept) {
    if (!bias.has_value()) return nullptr;
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_size, name, ": bias must be float32 with one ",
                "value per output (", n_size, "), got ", bias->scalar_type(), " of ", bias->numel());
    kept = bias->contiguous();
    return kept.data_ptr<float>();
}

at::Tensor int8_vnni_matmul(const at::Tensor& rows, const at::Tensor& packed_weight, const at::Tensor& weight_scale,
                            const at::Tensor& weight_sums, const std::optional<at::Tensor>& bias, bool relu) {
    check_operands("int8_vnni_matmul", rows, true, packed_weight, weight_scale, weight_sums, (int64_t{1} << 16) - 1);
    const at::Tensor x = rows.contiguous(), w = packed_weight.contiguous();
    const at::Tensor scale = weight_scale.contiguous(), sums = weight_sums.contiguous();
    at::Tensor kept_bias;
    const float* added = bias_data("int8_vnni_matmul", bias, scale.numel(), kept_bias);
    at::Tensor out = at::empty({x.size(0), scale.numel()}, x.options().dtype(at::kFloat));
    if (x.scalar_type() == at::kFloat)
        int8_vnni_kernel(x.data_ptr<float>(), w.data_ptr<int8_t>(), scale.data_ptr<float>(), sums.data_ptr<int32_t>(),
                         added, relu, out.data_ptr<float>(), x.size(0), scale.numel(), x.size(1));
    else
        int8_vnni_kernel(reinterpret_cast<const uint16_t*>(x.data_ptr()), w.data_ptr<int8_t>(), scale.data_ptr<float>(),
                         sums.data_ptr<int32_t>(), added, relu, out.data_ptr<float>(), x.size(0), scale.numel(),
                         x.size(1));
    return out;
}

at::Tensor int8_avx2_matmul(const at::Tensor& rows, const at::Tensor& packed_weight, const at::Tensor& weight_scale,
                            const at::Tensor& weight_sums, const std::optional<at::Tensor>& bias, bool relu) {
    check_operands("int8_avx2_matmul", rows, false, packed_weight, weight_scale, weight_sums, (int64_t{1} << 17) - 1);
    const at::Tensor x = rows.contiguous(), w = packed_weight.contiguous();
    const at::Tensor scale = weight_scale.contiguous(), sums = weight_sums.contiguous();
    at::Tensor kept_bias;
    const float* added = bias_data("int8_avx2_matmul", bias, scale.numel(), kept_bias);
    at::Tensor out = at::empty({x.size(0), scale.numel()}, x.options());
    int8_avx2_kernel(x.data_ptr<float>(), w.data_ptr<int8_t>(), scale.data_ptr<float>(), sums.data_ptr<int32_t>(),
                     added, relu, out.data_ptr<float>(), x.size(0), scale.numel(), x.size(1));
    return out;
}

}  // namespace

TORCH_LIBRARY(hf_attention, m) {
    m.def("int8_vnni_matmul(Tensor rows, Tensor packed_weight, Tensor weight_scale, Tensor weight_sums, "
          "Tensor? bias=None, bool relu=False) -> Tensor");
    m.def("int8_avx2_matmul(Tensor rows, Tensor packed_weight, Tensor weight_scale, Tensor weight_sums, "
          "Tensor? bias=None, bool relu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_attention, CPU, m) {
    m.impl("int8_vnni_matmul", &int8_vnni_matmul);
    m.impl("int8_avx2_matmul", &int8_avx2_matmul);
}
