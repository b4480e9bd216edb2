// The CUDA twins of fused.rs's CPU kernels (float32, contiguous rows of length n; the
// activation, the bias and its column sum also in bfloat16; at the end AdamW's update and the
// gradient norm's sum of squares), compiled at run time through NVRTC (fused_cuda.rs), and on
// the CPU by tools/check-fused-cu.sh. Same arithmetic as the CPU side: LayerNorm with the biased
// variance from a second pass over the row, softmax with the row maximum subtracted, closed-form
// activation derivatives; column sums go through fixed row chunks added in chunk order, so
// results do not depend on scheduling.

#define BLOCK 256
#define ROWS_PER_CHUNK 64

// bfloat16 (mixed precision, `train.precision = "bf16"`): the activation and the bias of the
// products that run in bfloat16 read and write bf16 bit patterns (no cuda_bf16.h needed at
// NVRTC time), compute in float32 and round once to the nearest bf16, ties to even, as candle's
// `half::bf16::from_f32` and PyTorch do; their column sums accumulate in float32. The kernels
// below are written once over the element type (`load`, `store`) and named per type.

typedef unsigned short bf16_bits;

__device__ float bf16_to_float(bf16_bits h) { return __uint_as_float(((unsigned)h) << 16); }

__device__ bf16_bits float_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_bits)((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_bits)(u >> 16);
}

__device__ float load(const float* p, size_t i) { return p[i]; }
__device__ float load(const bf16_bits* p, size_t i) { return bf16_to_float(p[i]); }
__device__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ void store(bf16_bits* p, size_t i, float v) { p[i] = float_to_bf16(v); }

// The block's total of v (float32, or float64 for the gradient norm), in every thread.
template <typename T>
__device__ T block_sum(T v, T* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    T total = 0;
    int warps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < warps; ++w) total += shared[w];
    return total;
}

__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = __int_as_float(0xff800000);
    int warps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, shared[w]);
    return m;
}

// A row's mean and 1/std (biased variance from a second pass, as torch.nn.LayerNorm), by the
// whole block.
__device__ void row_stats(const float* xr, int n, float eps, float* shared, float* mean,
                          float* rstd) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    float m = block_sum(s, shared) / n;
    float q = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float d = xr[i] - m;
        q += d * d;
    }
    *mean = m;
    *rstd = rsqrtf(block_sum(q, shared) / n + eps);
}

// One block per row: y = (x - mean) * rstd * w + b, stored as float32 or (mixed precision: the
// LayerNorm whose output feeds bfloat16 products) rounded once to bfloat16.
template <typename Out>
__device__ void layer_norm_fwd(const float* x, const float* w, const float* b, Out* y, int n,
                               float eps) {
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    Out* yr = y + (size_t)blockIdx.x * n;
    float mean, rstd;
    row_stats(xr, n, eps, shared, &mean, &rstd);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        store(yr, i, (xr[i] - mean) * rstd * w[i] + b[i]);
}

extern "C" __global__ void vl_layer_norm_fwd(const float* x, const float* w, const float* b,
                                             float* y, int n, float eps) {
    layer_norm_fwd(x, w, b, y, n, eps);
}

extern "C" __global__ void vl_layer_norm_fwd_bf16(const float* x, const float* w, const float* b,
                                                  bf16_bits* y, int n, float eps) {
    layer_norm_fwd(x, w, b, y, n, eps);
}

// One block per row: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; the
// row's mean and rstd are kept for the weight gradients. dy is float32, or bfloat16 (the
// gradient of vl_layer_norm_fwd_bf16's output); dx and the sums below are float32 either way.
template <typename Dy>
__device__ void layer_norm_bwd_dx(const float* x, const float* w, const Dy* dy, float* dx,
                                  float* stats, int n, float eps) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float* xr = x + row * n;
    const Dy* gr = dy + row * n;
    float* dr = dx + row * n;
    float mean, rstd;
    row_stats(xr, n, eps, shared, &mean, &rstd);
    float mg = 0.0f, mgx = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float g = load(gr, i) * w[i];
        mg += g;
        mgx += g * (xr[i] - mean) * rstd;
    }
    mg = block_sum(mg, shared) / n;
    mgx = block_sum(mgx, shared) / n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float xhat = (xr[i] - mean) * rstd;
        dr[i] = rstd * (load(gr, i) * w[i] - mg - xhat * mgx);
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

extern "C" __global__ void vl_layer_norm_bwd_dx(const float* x, const float* w, const float* dy,
                                                float* dx, float* stats, int n, float eps) {
    layer_norm_bwd_dx(x, w, dy, dx, stats, n, eps);
}

extern "C" __global__ void vl_layer_norm_bwd_dx_bf16(const float* x, const float* w,
                                                     const bf16_bits* dy, float* dx, float* stats,
                                                     int n, float eps) {
    layer_norm_bwd_dx(x, w, dy, dx, stats, n, eps);
}

// Grid (column blocks, row-chunk slots): partial[chunk][j] = sum over the chunk's rows of
// dy * xhat (dw) and, at offset n, of dy (db); slot y takes chunks y, y + gridDim.y, ...
template <typename Dy>
__device__ void layer_norm_bwd_partial(const float* x, const Dy* dy, const float* stats,
                                       float* partial, int rows, int n) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int chunks = (rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
    for (int c = blockIdx.y; c < chunks; c += gridDim.y) {
        int r0 = c * ROWS_PER_CHUNK;
        int r1 = min(r0 + ROWS_PER_CHUNK, rows);
        float dw = 0.0f, db = 0.0f;
        for (int r = r0; r < r1; ++r) {
            float g = load(dy, (size_t)r * n + j);
            dw += g * (x[(size_t)r * n + j] - stats[2 * r]) * stats[2 * r + 1];
            db += g;
        }
        partial[(size_t)c * 2 * n + j] = dw;
        partial[(size_t)c * 2 * n + n + j] = db;
    }
}

extern "C" __global__ void vl_layer_norm_bwd_partial(const float* x, const float* dy,
                                                     const float* stats, float* partial,
                                                     int rows, int n) {
    layer_norm_bwd_partial(x, dy, stats, partial, rows, n);
}

extern "C" __global__ void vl_layer_norm_bwd_partial_bf16(const float* x, const bf16_bits* dy,
                                                          const float* stats, float* partial,
                                                          int rows, int n) {
    layer_norm_bwd_partial(x, dy, stats, partial, rows, n);
}

// out[j] = sum over chunks c (in order) of partial[c][j], for j < width (grid-stride: the
// launch caps its blocks).
extern "C" __global__ void vl_sum_chunks(const float* partial, float* out, int chunks,
                                         int width) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < width; j += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * width + j];
        out[j] = s;
    }
}

// Grid (column blocks, row-chunk slots): partial[chunk][j] = sum over the chunk's rows of
// x[r][j], in float32; slot y takes chunks y, y + gridDim.y, ...
template <typename T>
__device__ void column_sum_partial(const T* x, float* partial, int rows, int n) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int chunks = (rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
    for (int c = blockIdx.y; c < chunks; c += gridDim.y) {
        int r0 = c * ROWS_PER_CHUNK;
        int r1 = min(r0 + ROWS_PER_CHUNK, rows);
        float s = 0.0f;
        for (int r = r0; r < r1; ++r) s += load(x, (size_t)r * n + j);
        partial[(size_t)c * n + j] = s;
    }
}

extern "C" __global__ void vl_column_sum_partial(const float* x, float* partial, int rows, int n) {
    column_sum_partial(x, partial, rows, n);
}

// The same over bfloat16 rows (vl_sum_chunks adds the partials, vl_round_bf16 rounds the total).
extern "C" __global__ void vl_column_sum_partial_bf16(const bf16_bits* x, float* partial, int rows,
                                                      int n) {
    column_sum_partial(x, partial, rows, n);
}

extern "C" __global__ void vl_round_bf16(const float* x, bf16_bits* y, size_t len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = float_to_bf16(x[i]);
}

// One block per row: y = exp(x - max) / sum.
extern "C" __global__ void vl_softmax_fwd(const float* x, float* y, int n) {
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, shared);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(xr[i] - m);
        yr[i] = e;
        s += e;
    }
    float inv = 1.0f / block_sum(s, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] *= inv;
}

// One block per row: dx = y * (dy - sum(dy * y)).
extern "C" __global__ void vl_softmax_bwd(const float* y, const float* dy, float* dx, int n) {
    __shared__ float shared[32];
    size_t off = (size_t)blockIdx.x * n;
    float d = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) d += y[off + i] * dy[off + i];
    d = block_sum(d, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x) dx[off + i] = y[off + i] * (dy[off + i] - d);
}

// act: 0 = quick_gelu x * sigmoid(1.702 x), 1 = exact gelu x Φ(x). Φ(x) = erfc(-x / sqrt 2) / 2
// (PyTorch's CUDA kernel takes normcdf): 1 + erf(x / sqrt 2), as the CPU kernel and PyTorch's
// CPU one write it, cancels in float32 below x ≈ -4.5 (gelu(-5.5) = -1.04e-7 comes out
// -1.64e-7, gelu(-6) = -5.9e-9 comes out 0): harmless beside values of order 1, but a bfloat16
// result is exact to 8 bits at any magnitude, and tools/check-fused-cu.sh holds it to that.
__device__ float act_f(int act, float x) {
    if (act == 0) return x / (1.0f + expf(-1.702f * x));
    return 0.5f * x * erfcf(x * -0.70710678118654752f);
}

__device__ float act_df(int act, float x) {
    if (act == 0) {
        float s = 1.0f / (1.0f + expf(-1.702f * x));
        return s + 1.702f * x * s * (1.0f - s);
    }
    float cdf = 0.5f * erfcf(x * -0.70710678118654752f);
    float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
    return cdf + x * pdf;
}

template <typename T>
__device__ void act_fwd(const T* x, T* y, size_t len, int act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        store(y, i, act_f(act, load(x, i)));
}

template <typename T>
__device__ void act_bwd(const T* x, const T* dy, T* dx, size_t len, int act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        store(dx, i, load(dy, i) * act_df(act, load(x, i)));
}

// y[r][j] = x[r][j] + b[j] (in float32, stored once).
template <typename T>
__device__ void add_bias(const T* x, const T* b, T* y, size_t len, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        store(y, i, load(x, i) + load(b, i % n));
}

extern "C" __global__ void vl_act_fwd(const float* x, float* y, size_t len, int act) {
    act_fwd(x, y, len, act);
}

extern "C" __global__ void vl_act_bwd(const float* x, const float* dy, float* dx, size_t len,
                                      int act) {
    act_bwd(x, dy, dx, len, act);
}

extern "C" __global__ void vl_add_bias(const float* x, const float* b, float* y, size_t len,
                                       int n) {
    add_bias(x, b, y, len, n);
}

extern "C" __global__ void vl_act_fwd_bf16(const bf16_bits* x, bf16_bits* y, size_t len, int act) {
    act_fwd(x, y, len, act);
}

extern "C" __global__ void vl_act_bwd_bf16(const bf16_bits* x, const bf16_bits* dy, bf16_bits* dx,
                                           size_t len, int act) {
    act_bwd(x, dy, dx, len, act);
}

extern "C" __global__ void vl_add_bias_bf16(const bf16_bits* x, const bf16_bits* b, bf16_bits* y,
                                            size_t len, int n) {
    add_bias(x, b, y, len, n);
}

// Attention probabilities in mixed precision: row r of bfloat16 scores (row r = (b·H + h)·Tq + q,
// n = Tk) gives p = softmax(scale·x + mask[b][q]) in float32, stored as bfloat16 for the product
// with v — what the composition's cast, scale, mask add, softmax and cast give, in one pass and
// without keeping the float32 probabilities: the backward recomputes them. `mask` is [B, Tq, n]
// float32, or null; `hq` = H·Tq.
__device__ const float* mask_row(const float* mask, size_t r, int hq, int q_len, int n) {
    if (mask == 0) return 0;
    return mask + ((r / hq) * (size_t)q_len + r % q_len) * n;
}

__device__ float scaled_masked(const bf16_bits* xr, const float* mr, int i, float scale) {
    return scale * bf16_to_float(xr[i]) + (mr ? mr[i] : 0.0f);
}

// The row's max and 1 / Σ exp(z - max) of z = scale·x + mask, by the whole block.
__device__ void softmax_stats(const bf16_bits* xr, const float* mr, int n, float scale,
                              float* shared, float* max_out, float* inv_out) {
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, scaled_masked(xr, mr, i, scale));
    m = block_max(m, shared);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(scaled_masked(xr, mr, i, scale) - m);
    *max_out = m;
    *inv_out = 1.0f / block_sum(s, shared);
}

extern "C" __global__ void vl_attn_softmax_fwd_bf16(const bf16_bits* x, const float* mask,
                                                    bf16_bits* y, int n, float scale, int hq,
                                                    int q_len) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const bf16_bits* xr = x + r * n;
    const float* mr = mask_row(mask, r, hq, q_len, n);
    float m, inv;
    softmax_stats(xr, mr, n, scale, shared, &m, &inv);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        y[r * n + i] = float_to_bf16(expf(scaled_masked(xr, mr, i, scale) - m) * inv);
}

// dx = scale · p ⊙ (dy − Σ dy ⊙ p), p recomputed in float32 from x and the mask.
extern "C" __global__ void vl_attn_softmax_bwd_bf16(const bf16_bits* x, const float* mask,
                                                    const bf16_bits* dy, bf16_bits* dx, int n,
                                                    float scale, int hq, int q_len) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const bf16_bits* xr = x + r * n;
    const bf16_bits* gr = dy + r * n;
    const float* mr = mask_row(mask, r, hq, q_len, n);
    float m, inv;
    softmax_stats(xr, mr, n, scale, shared, &m, &inv);
    float d = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        d += bf16_to_float(gr[i]) * expf(scaled_masked(xr, mr, i, scale) - m) * inv;
    d = block_sum(d, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float p = expf(scaled_masked(xr, mr, i, scale) - m) * inv;
        dx[r * n + i] = float_to_bf16(scale * p * (bf16_to_float(gr[i]) - d));
    }
}

// AdamW's in-place update (train/adamw_fused.rs) in the CPU kernels' arithmetic, operation for
// operation: each product, quotient, sum and square root is rounded on its own (the `_rn`
// intrinsics are never contracted into a fused multiply-add), so a CUDA update gives the CPU
// update's bits. The `+ 0` steps turn a -0 into +0 as the CPU side (and candle's `affine`) do.
// A moment: m ← (m·β + 0) + (g·(1 − β) + 0), with g² for the second (`square`).
extern "C" __global__ void vl_adamw_moment(float* m, const float* g, size_t len, float beta,
                                           float one_minus_beta, int square) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        float gi = square ? __fmul_rn(g[i], g[i]) : g[i];
        m[i] = __fadd_rn(__fadd_rn(__fmul_rn(m[i], beta), 0.0f),
                         __fadd_rn(__fmul_rn(gi, one_minus_beta), 0.0f));
    }
}

// The step: θ ← [θ·(1 − lr·λ) + 0] − ((m / ((√v · inv_bc2_sqrt + 0)·1 + ε))·rate + 0), the decay
// only when `decayed`; inv_bc2_sqrt = 1/√(1 − β₂ᵗ), rate = lr / (1 − β₁ᵗ).
extern "C" __global__ void vl_adamw_step(float* theta, const float* m, const float* v, size_t len,
                                         int decayed, float decay, float inv_bc2_sqrt, float eps,
                                         float rate) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        float t = decayed ? __fadd_rn(__fmul_rn(theta[i], decay), 0.0f) : theta[i];
        float denom = __fadd_rn(
            __fmul_rn(__fadd_rn(__fmul_rn(__fsqrt_rn(v[i]), inv_bc2_sqrt), 0.0f), 1.0f), eps);
        theta[i] = __fsub_rn(t, __fadd_rn(__fmul_rn(__fdiv_rn(m[i], denom), rate), 0.0f));
    }
}

// Σ g² of a float32 gradient for the global-norm clip (train/optim.rs `clip_grad_norm`), in
// float64: each block sums its grid-strided share, the partials are added in block order by
// vl_sumsq_total onto the running total of the gradients before — a fixed association for a
// given length, so the norm is the same on every run.
extern "C" __global__ void vl_sumsq_partial(const float* g, size_t len, double* partial) {
    __shared__ double shared[32];
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        double x = g[i];
        s += x * x;
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// total_out = total_in + (partial[0] + partial[1] + … + partial[blocks − 1]), by one thread.
extern "C" __global__ void vl_sumsq_total(const double* partial, int blocks, const double* total_in,
                                          double* total_out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (int b = 0; b < blocks; ++b) s += partial[b];
    total_out[0] = total_in[0] + s;
}

// Mixed precision's residual add: y = x + h, x the float32 residual stream, h a block's bfloat16
// output, in float32 — the composition's cast of h and add in one pass, without the float32 copy
// of h. (The backward is dy for x and dy rounded to bfloat16 for h: candle's cast.)
extern "C" __global__ void vl_add_widened_bf16(const float* x, const bf16_bits* h, float* y,
                                               size_t len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = x[i] + bf16_to_float(h[i]);
}
