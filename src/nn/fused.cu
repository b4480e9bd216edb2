// The CUDA twins of fused.rs's CPU kernels (float32, contiguous rows of length n), compiled at
// run time through NVRTC (fused_cuda.rs). Same arithmetic as the CPU side: LayerNorm with the
// biased variance from a second pass over the row, softmax with the row maximum subtracted,
// closed-form activation derivatives; column sums go through fixed row chunks added in chunk
// order, so results do not depend on scheduling.

#define BLOCK 256
#define ROWS_PER_CHUNK 64

__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.0f;
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

// One block per row: y = (x - mean) * rstd * w + b.
extern "C" __global__ void vl_layer_norm_fwd(const float* x, const float* w, const float* b,
                                             float* y, int n, float eps) {
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    float mean, rstd;
    row_stats(xr, n, eps, shared, &mean, &rstd);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
}

// One block per row: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; the
// row's mean and rstd are kept for the weight gradients.
extern "C" __global__ void vl_layer_norm_bwd_dx(const float* x, const float* w, const float* dy,
                                                float* dx, float* stats, int n, float eps) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    const float* xr = x + row * n;
    const float* gr = dy + row * n;
    float* dr = dx + row * n;
    float mean, rstd;
    row_stats(xr, n, eps, shared, &mean, &rstd);
    float mg = 0.0f, mgx = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float g = gr[i] * w[i];
        mg += g;
        mgx += g * (xr[i] - mean) * rstd;
    }
    mg = block_sum(mg, shared) / n;
    mgx = block_sum(mgx, shared) / n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float xhat = (xr[i] - mean) * rstd;
        dr[i] = rstd * (gr[i] * w[i] - mg - xhat * mgx);
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// Grid (column blocks, row chunks): partial[chunk][j] = sum over the chunk's rows of
// dy * xhat (dw) and, at offset n, of dy (db).
extern "C" __global__ void vl_layer_norm_bwd_partial(const float* x, const float* dy,
                                                     const float* stats, float* partial,
                                                     int rows, int n) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int r0 = blockIdx.y * ROWS_PER_CHUNK;
    int r1 = min(r0 + ROWS_PER_CHUNK, rows);
    float dw = 0.0f, db = 0.0f;
    for (int r = r0; r < r1; ++r) {
        float g = dy[(size_t)r * n + j];
        dw += g * (x[(size_t)r * n + j] - stats[2 * r]) * stats[2 * r + 1];
        db += g;
    }
    partial[(size_t)blockIdx.y * 2 * n + j] = dw;
    partial[(size_t)blockIdx.y * 2 * n + n + j] = db;
}

// out[j] = sum over chunks c (in order) of partial[c][j], for j < width.
extern "C" __global__ void vl_sum_chunks(const float* partial, float* out, int chunks,
                                         int width) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * width + j];
    out[j] = s;
}

// Grid (column blocks, row chunks): partial[chunk][j] = sum over the chunk's rows of x[r][j].
extern "C" __global__ void vl_column_sum_partial(const float* x, float* partial, int rows, int n) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int r0 = blockIdx.y * ROWS_PER_CHUNK;
    int r1 = min(r0 + ROWS_PER_CHUNK, rows);
    float s = 0.0f;
    for (int r = r0; r < r1; ++r) s += x[(size_t)r * n + j];
    partial[(size_t)blockIdx.y * n + j] = s;
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

// act: 0 = quick_gelu x * sigmoid(1.702 x), 1 = exact gelu 0.5 x (1 + erf(x / sqrt 2)).
__device__ float act_f(int act, float x) {
    if (act == 0) return x / (1.0f + expf(-1.702f * x));
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

__device__ float act_df(int act, float x) {
    if (act == 0) {
        float s = 1.0f / (1.0f + expf(-1.702f * x));
        return s + 1.702f * x * s * (1.0f - s);
    }
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
    return cdf + x * pdf;
}

extern "C" __global__ void vl_act_fwd(const float* x, float* y, size_t len, int act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = act_f(act, x[i]);
}

extern "C" __global__ void vl_act_bwd(const float* x, const float* dy, float* dx, size_t len,
                                      int act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        dx[i] = dy[i] * act_df(act, x[i]);
}

// y[r][j] = x[r][j] + b[j].
extern "C" __global__ void vl_add_bias(const float* x, const float* b, float* y, size_t len,
                                       int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = x[i] + b[i % n];
}
