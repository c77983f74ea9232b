// One decoding step's attention over a cache that beam search never reorders
// (see hf_attention/inference/int8_vnni.py and generation_hf_attention.AncestralCacheLayer).
//
// torch.ops.hf_attention.cached_attention(query, keys, values, ancestors, length, scaling, bias=None):
//   query      (B, H, Dh)               this step's queries, float32 or bf16
//   keys       (positions, rows, H, Dh) float32 or bf16 (as values), any strides but the last (1); self-attention:
//                                       position j as the hypothesis in row b computed it at step j; cross-attention:
//                                       the encoder output's projections, one row per source
//   ancestors  (B, >= length) int64     ancestors[b, j]: the row whose position j query b reads
//   bias       (rows, >= length) float  optional, added to the scores (the source padding mask: 0 or -inf)
//   -> (B, H, Dh) in the query's dtype: softmax(q kᵀ · scaling + bias) v over positions 0..length-1.
// Each query reads its keys and values once, through `ancestors`, so that a beam reorder moves B × length integers
// instead of the cache, a source's beams read its one copy, and nothing is copied to gather the keys first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

struct Layout {  // element strides of the keys and values (positions, rows, heads) and of ancestors and bias
    int64_t position, row, head, ancestor_row, ancestor_position, bias_row;
};

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")  // built and called only where the capability map reports AVX2

// Every sum below runs in an order that depends on nothing but the head size and the position: a row must score
// the same wherever it sits in a batch and however far its source is padded (a server's answers must not change).

constexpr float kMasked = -1e30f;  // a bias at or below this masks its position

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const uint16_t* p) {  // 8 bf16, widened: each is the upper half of a float32
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

inline float sum8(__m256 v) {  // ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))
    const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

// exp(x) for x <= 0 (scores less their maximum): 2^n · p(r), r = x − n ln 2, Cephes' degree-6 polynomial (relative
// error ~2e-7); below −87.3 (where float32's exp leaves the normal range) and for −inf (masked positions) exactly 0.
inline __m256 exp8(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.3365f);
    const __m256 kept = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
    x = _mm256_max_ps(x, lowest);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(exponent)), kept);
}

// One query row: Blocks × 8 = head size. Positions outermost: each position's keys (then values), all heads, are one
// contiguous read. (Heads outermost would read a position's heads apart in time, and positions of a cache for 32
// rows lie 64 KB apart: the same cache sets, which evict each other before the next head comes back to them.)
// `offsets[j]`: where position j of this row's ancestry starts in the keys and values; `scores`: heads × `padded`.
template <int Blocks, typename Query, typename State>
void attend_row(const Query* query, const State* keys, const State* values, const int64_t* offsets,
                const float* bias, const int64_t* bias_rows, float* out, int64_t heads, int64_t length, int64_t padded,
                int64_t head_stride, float scaling, float* scores, float* q) {
    constexpr int64_t head_dim = Blocks * 8;
    const __m256 scale = _mm256_set1_ps(scaling);
    for (int64_t i = 0; i < heads * head_dim; i += 8) _mm256_storeu_ps(q + i, _mm256_mul_ps(load8(query + i), scale));
    for (int64_t j = 0; j < length; ++j) {
        const State* key = keys + offsets[j];
        const float added = bias == nullptr ? 0.f : bias[bias_rows[j] + j];
        for (int64_t h = 0; h < heads; ++h) {
            const float* qh = q + h * head_dim;
            const State* kh = key + h * head_stride;
            __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(qh), load8(kh));
            for (int k = 1; k < Blocks; ++k) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * k), load8(kh + 8 * k), dot);
            scores[h * padded + j] = sum8(dot) + added;
        }
    }
    for (int64_t h = 0; h < heads; ++h) {  // softmax over each head's positions, left unnormalised
        float* sh = scores + h * padded;
        for (int64_t j = length; j < padded; ++j) sh[j] = -INFINITY;
        __m256 top = _mm256_set1_ps(-INFINITY);
        for (int64_t j = 0; j < padded; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(sh + j));
        const __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        const __m128 top2 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
        const __m256 maximum = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(top2, _mm_movehdup_ps(top2))));
        __m256 total = _mm256_setzero_ps();
        for (int64_t j = 0; j < padded; j += 8) {
            const __m256 weight = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), maximum));
            _mm256_storeu_ps(sh + j, weight);
            total = _mm256_add_ps(total, weight);
        }
        q[h] = 1.f / sum8(total);  // the query is spent: its first floats keep each head's normaliser
    }
    for (int64_t i = 0; i < heads * head_dim; i += 8) _mm256_storeu_ps(out + i, _mm256_setzero_ps());
    for (int64_t j = 0; j < length; ++j) {
        const State* value = values + offsets[j];
        for (int64_t h = 0; h < heads; ++h) {
            const __m256 weight = _mm256_set1_ps(scores[h * padded + j]);
            const State* vh = value + h * head_stride;
            float* oh = out + h * head_dim;
            for (int k = 0; k < Blocks; ++k)
                _mm256_storeu_ps(oh + 8 * k, _mm256_fmadd_ps(weight, load8(vh + 8 * k), _mm256_loadu_ps(oh + 8 * k)));
        }
    }
    for (int64_t h = 0; h < heads; ++h) {
        const __m256 inverse = _mm256_set1_ps(q[h]);
        float* oh = out + h * head_dim;
        for (int k = 0; k < Blocks; ++k) _mm256_storeu_ps(oh + 8 * k, _mm256_mul_ps(_mm256_loadu_ps(oh + 8 * k), inverse));
    }
}

template <int Blocks, typename Query, typename State>
void attend_rows(const Query* query, const State* keys, const State* values, const int64_t* ancestors,
                 const float* bias, float* out, int64_t batch, int64_t heads, int64_t length, const Layout& layout,
                 float scaling) {
    const int64_t row_size = heads * Blocks * 8;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(heads * ((length + 7) / 8 * 8)), q(row_size);
        std::vector<int64_t> offsets(length), bias_rows(length);
        for (int64_t b = begin; b < end; ++b) {
            const int64_t* rows = ancestors + b * layout.ancestor_row;
            for (int64_t j = 0; j < length; ++j) {
                const int64_t row = rows[j * layout.ancestor_position];
                offsets[j] = j * layout.position + row * layout.row;
                bias_rows[j] = row * layout.bias_row;
            }
            // A source padded on the right: its last masked positions (a bias of -inf, or of float32's lowest as
            // additive masks have it) weigh exactly 0 beside any position not masked, so they are not read: a batch's
            // short sources cost what they would alone. All masked: kept, to give softmax's NaN.
            int64_t attended = length;
            if (bias != nullptr) {
                while (attended > 0 && bias[bias_rows[attended - 1] + attended - 1] <= kMasked) --attended;
                if (attended == 0) attended = length;
            }
            attend_row<Blocks>(query + b * row_size, keys, values, offsets.data(), bias, bias_rows.data(),
                               out + b * row_size, heads, attended, (attended + 7) / 8 * 8, layout.head, scaling,
                               scores.data(), q.data());
        }
    });
}
#pragma GCC pop_options
#endif

inline float as_float(float value) { return value; }

inline float as_float(uint16_t bf16) {  // a bf16 is the upper half of a float32
    const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

// Any head size: the scalar reference of the kernels above (each dot product in 8 lanes, as they sum).
template <typename State>
inline float dot_product(const float* query, const State* key, int64_t size) {
    constexpr int64_t kLanes = 8;
    float lanes[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= size; d += kLanes)
        for (int64_t lane = 0; lane < kLanes; ++lane) lanes[lane] += query[d + lane] * as_float(key[d + lane]);
    for (; d < size; ++d) lanes[0] += query[d] * as_float(key[d]);
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

template <typename Query, typename State>
void attend_rows_any_size(const Query* query, const State* keys, const State* values, const int64_t* ancestors,
                          const float* bias, float* out, int64_t batch, int64_t heads, int64_t head_dim,
                          int64_t length, const Layout& layout, float scaling) {
    const int64_t row_size = heads * head_dim;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(heads * length), q(row_size), acc(row_size);
        for (int64_t b = begin; b < end; ++b) {
            const int64_t* rows = ancestors + b * layout.ancestor_row;
            for (int64_t i = 0; i < row_size; ++i) q[i] = as_float(query[b * row_size + i]) * scaling;
            for (int64_t j = 0; j < length; ++j) {
                const int64_t row = rows[j * layout.ancestor_position];
                const State* key = keys + j * layout.position + row * layout.row;
                const float added = bias == nullptr ? 0.f : bias[row * layout.bias_row + j];
                for (int64_t h = 0; h < heads; ++h)
                    scores[h * length + j] = dot_product(q.data() + h * head_dim, key + h * layout.head, head_dim) + added;
            }
            for (int64_t h = 0; h < heads; ++h) {  // softmax over each head's positions
                float* sh = scores.data() + h * length;
                const float top = *std::max_element(sh, sh + length);
                float total = 0.f;
                for (int64_t j = 0; j < length; ++j) total += (sh[j] = std::exp(sh[j] - top));
                const float inverse = 1.f / total;
                for (int64_t j = 0; j < length; ++j) sh[j] *= inverse;
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t j = 0; j < length; ++j) {
                const State* value = values + j * layout.position + rows[j * layout.ancestor_position] * layout.row;
                for (int64_t h = 0; h < heads; ++h) {
                    const float weight = scores[h * length + j];
                    float* ah = acc.data() + h * head_dim;
                    const State* vh = value + h * layout.head;
                    for (int64_t d = 0; d < head_dim; ++d) ah[d] += weight * as_float(vh[d]);
                }
            }
            std::copy(acc.begin(), acc.end(), out + b * row_size);
        }
    });
}

template <typename Query, typename State>
void cached_attention_kernel(const Query* query, const State* keys, const State* values, const int64_t* ancestors,
                             const float* bias, float* out, int64_t batch, int64_t heads, int64_t head_dim,
                             int64_t length, const Layout& layout, float scaling) {
#if defined(__x86_64__)
    switch (head_dim) {  // the head sizes of Table 3 (64) and of smaller and larger models
        case 8: return attend_rows<1>(query, keys, values, ancestors, bias, out, batch, heads, length, layout, scaling);
        case 16: return attend_rows<2>(query, keys, values, ancestors, bias, out, batch, heads, length, layout, scaling);
        case 32: return attend_rows<4>(query, keys, values, ancestors, bias, out, batch, heads, length, layout, scaling);
        case 64: return attend_rows<8>(query, keys, values, ancestors, bias, out, batch, heads, length, layout, scaling);
        case 128: return attend_rows<16>(query, keys, values, ancestors, bias, out, batch, heads, length, layout, scaling);
    }
#endif
    attend_rows_any_size(query, keys, values, ancestors, bias, out, batch, heads, head_dim, length, layout, scaling);
}

template <typename Query>
void dispatch_state(const Query* query, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& ancestors,
                    const float* bias, const Layout& layout, float* out, int64_t batch, int64_t length, double scaling) {
    const int64_t heads = keys.size(2), head_dim = keys.size(3);
    const int64_t* rows = ancestors.data_ptr<int64_t>();
    if (keys.scalar_type() == at::kFloat)
        cached_attention_kernel(query, keys.data_ptr<float>(), values.data_ptr<float>(), rows, bias, out, batch, heads,
                                head_dim, length, layout, static_cast<float>(scaling));
    else
        cached_attention_kernel(query, reinterpret_cast<const uint16_t*>(keys.data_ptr()),
                                reinterpret_cast<const uint16_t*>(values.data_ptr()), rows, bias, out, batch, heads,
                                head_dim, length, layout, static_cast<float>(scaling));
}

at::Tensor cached_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& ancestors, int64_t length, double scaling,
                            const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(query.dim() == 3 && keys.dim() == 4 && keys.sizes() == values.sizes() && keys.strides() == values.strides(),
                "cached_attention: query (B, H, Dh) and keys, values (positions, rows, H, Dh) alike expected, got ",
                query.sizes(), ", ", keys.sizes(), ", ", values.sizes());
    TORCH_CHECK(keys.size(2) == query.size(1) && keys.size(3) == query.size(2) && keys.stride(3) == 1,
                "cached_attention: keys ", keys.sizes(), " do not match the query ", query.sizes(),
                " (or their last dimension is not contiguous)");
    TORCH_CHECK(ancestors.scalar_type() == at::kLong && ancestors.dim() == 2 && ancestors.size(0) == query.size(0),
                "cached_attention: ancestors must be int64 (B, positions), got ", ancestors.sizes());
    TORCH_CHECK(length >= 1 && length <= keys.size(0) && length <= ancestors.size(1),
                "cached_attention: length ", length, " outside 1..", std::min(keys.size(0), ancestors.size(1)));
    const int64_t* named = ancestors.data_ptr<int64_t>();
    for (int64_t b = 0; b < ancestors.size(0); ++b)
        for (int64_t j = 0; j < length; ++j) {
            const int64_t row = named[b * ancestors.stride(0) + j * ancestors.stride(1)];
            TORCH_CHECK(row >= 0 && row < keys.size(1), "cached_attention: ancestors[", b, ", ", j, "] = ", row,
                        " names no row of the keys (0..", keys.size(1) - 1, ")");
        }
    const auto state_type = keys.scalar_type();
    TORCH_CHECK(values.scalar_type() == state_type && (state_type == at::kFloat || state_type == at::kBFloat16),
                "cached_attention: keys and values must both be float32 or both bf16");
    TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16,
                "cached_attention: the query must be float32 or bf16");
    at::Tensor bias_rows;
    if (bias.has_value()) {
        bias_rows = bias->to(at::kFloat);
        TORCH_CHECK(bias_rows.dim() == 2 && bias_rows.size(0) == keys.size(1) && bias_rows.size(1) >= length &&
                        bias_rows.stride(1) == 1,
                    "cached_attention: bias must be (rows, positions) with contiguous rows, got ", bias_rows.sizes());
    }
    const Layout layout{keys.stride(0), keys.stride(1), keys.stride(2), ancestors.stride(0), ancestors.stride(1),
                        bias_rows.defined() ? bias_rows.stride(0) : 0};
    const float* bias_data = bias_rows.defined() ? bias_rows.data_ptr<float>() : nullptr;
    const at::Tensor q = query.contiguous();
    at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
    if (q.scalar_type() == at::kFloat)
        dispatch_state(q.data_ptr<float>(), keys, values, ancestors, bias_data, layout, out.data_ptr<float>(),
                       q.size(0), length, scaling);
    else
        dispatch_state(reinterpret_cast<const uint16_t*>(q.data_ptr()), keys, values, ancestors, bias_data, layout,
                       out.data_ptr<float>(), q.size(0), length, scaling);
    return out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hf_attention, m) {
    m.def("cached_attention(Tensor query, Tensor keys, Tensor values, Tensor ancestors, int length, float scaling, "
          "Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_attention, CPU, m) { m.impl("cached_attention", &cached_attention); }
