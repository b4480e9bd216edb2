// Runs every kernel of src/nn/fused.cu on the CPU (cuda_shim.h) with the launch geometry and
// buffer sizes of src/nn/fused_cuda.rs, and compares each result with a double-precision
// reference written from the definitions: LayerNorm, softmax, quick_gelu and exact GELU
// forward; their input gradients by central finite differences of that forward; LayerNorm's
// weight and bias gradients, the bias and the column sums as plain sums. The bfloat16 kernels
// must give the exact value (in double, from their bf16 inputs) rounded to the nearest bf16,
// within float32's own error before that one rounding; their float → bf16 rounding is checked
// against a nearest-value search over a sweep of bit patterns. Same thresholds as
// `vlalign bench --suite kernels` on a GPU (tools/device-check.sh (a0)): values within 1e-5,
// gradients within 1e-4 of the largest reference magnitude (at least 1). Exits 1 on a failure.
//
// Built and run by tools/check-fused-cu.sh, under AddressSanitizer (every buffer is allocated at
// the size fused_cuda.rs allocates, so a kernel that reads or writes past one stops the run).

#include "cuda_shim.h"

#include "../../src/nn/fused.cu"

namespace {

// fused_cuda.rs's launch geometry.
constexpr unsigned kBlock = 256;         // BLOCK
constexpr unsigned kRowsPerChunk = 64;   // ROWS_PER_CHUNK
unsigned max_elem_blocks = 1u << 16;     // elems_cfg's clamp (lowered by one pass below)
size_t max_chunk_slots = 65535;          // columns_cfg's MAX_GRID_Y (lowered likewise)
unsigned max_sumsq_blocks = 1024;        // sumsq_cfg's SUMSQ_BLOCKS (lowered likewise)

dim3 rows_cfg(size_t rows) { return dim3{unsigned(rows), 1, 1}; }
dim3 elems_cfg(size_t len) {
    size_t blocks = std::clamp<size_t>((len + kBlock - 1) / kBlock, 1, max_elem_blocks);
    return dim3{unsigned(blocks), 1, 1};
}
// (grid, chunks) of columns_cfg.
std::pair<dim3, size_t> columns_cfg(size_t rows, size_t n) {
    size_t chunks = std::max<size_t>((rows + kRowsPerChunk - 1) / kRowsPerChunk, 1);
    return {dim3{unsigned((n + kBlock - 1) / kBlock), unsigned(std::min(chunks, max_chunk_slots)), 1},
            chunks};
}
dim3 sumsq_cfg(size_t len) {
    size_t blocks = std::clamp<size_t>((len + kBlock - 1) / kBlock, 1, max_sumsq_blocks);
    return dim3{unsigned(blocks), 1, 1};
}
const dim3 block{kBlock, 1, 1};

using Vec = std::vector<float>;

// fused_cuda.rs's host functions, one for one.
Vec layer_norm(const Vec& x, const Vec& w, const Vec& b, size_t n, float eps) {
    Vec y(x.size());
    emu::launch(rows_cfg(x.size() / n), block, vl_layer_norm_fwd, x.data(), w.data(), b.data(),
                y.data(), int(n), eps);
    return y;
}

void sum_chunks(const Vec& partial, float* out, size_t chunks, size_t width) {
    emu::launch(elems_cfg(width), block, vl_sum_chunks, partial.data(), out, int(chunks), int(width));
}

// [dx (rows·n), dw (n), db (n)] from a float32 dy (vl_layer_norm_bwd_dx/_partial) or a
// bfloat16 one (their _bf16 twins).
template <class Dy>
Vec layer_norm_bwd_t(void (*dx_kernel)(const float*, const float*, const Dy*, float*, float*, int,
                                       float),
                     void (*partial_kernel)(const float*, const Dy*, const float*, float*, int,
                                            int),
                     const Vec& x, const Vec& w, const std::vector<Dy>& dy, size_t n, float eps) {
    size_t len = x.size(), rows = len / n;
    Vec out(len + 2 * n);
    Vec stats(2 * std::max<size_t>(rows, 1));
    emu::launch(rows_cfg(rows), block, dx_kernel, x.data(), w.data(), dy.data(), out.data(),
                stats.data(), int(n), eps);
    auto [cfg, chunks] = columns_cfg(rows, n);
    Vec partial(chunks * 2 * n);
    emu::launch(cfg, block, partial_kernel, x.data(), dy.data(), (const float*)stats.data(),
                partial.data(), int(rows), int(n));
    sum_chunks(partial, out.data() + len, chunks, 2 * n);
    return out;
}

Vec layer_norm_bwd(const Vec& x, const Vec& w, const Vec& dy, size_t n, float eps) {
    return layer_norm_bwd_t(vl_layer_norm_bwd_dx, vl_layer_norm_bwd_partial, x, w, dy, n, eps);
}

std::vector<bf16_bits> layer_norm_bf16(const Vec& x, const Vec& w, const Vec& b, size_t n,
                                       float eps) {
    std::vector<bf16_bits> y(x.size());
    emu::launch(rows_cfg(x.size() / n), block, vl_layer_norm_fwd_bf16, x.data(), w.data(),
                b.data(), y.data(), int(n), eps);
    return y;
}

Vec softmax(const Vec& x, size_t n) {
    Vec y(x.size());
    emu::launch(rows_cfg(x.size() / n), block, vl_softmax_fwd, x.data(), y.data(), int(n));
    return y;
}

Vec softmax_bwd(const Vec& y, const Vec& dy, size_t n) {
    Vec dx(y.size());
    emu::launch(rows_cfg(y.size() / n), block, vl_softmax_bwd, y.data(), dy.data(), dx.data(),
                int(n));
    return dx;
}

// The elementwise kernels and column sums, of either element type T (fused_cuda.rs's
// activation_t, activation_bwd_t, add_bias_t, column_sum_t).
template <class T>
std::vector<T> run_act(void (*k)(const T*, T*, size_t, int), const std::vector<T>& x, int act) {
    std::vector<T> y(x.size());
    emu::launch(elems_cfg(x.size()), block, k, x.data(), y.data(), size_t(x.size()), act);
    return y;
}

template <class T>
std::vector<T> run_act_bwd(void (*k)(const T*, const T*, T*, size_t, int), const std::vector<T>& x,
                           const std::vector<T>& dy, int act) {
    std::vector<T> dx(x.size());
    emu::launch(elems_cfg(x.size()), block, k, x.data(), dy.data(), dx.data(), size_t(x.size()),
                act);
    return dx;
}

template <class T>
std::vector<T> run_add_bias(void (*k)(const T*, const T*, T*, size_t, int),
                            const std::vector<T>& x, const std::vector<T>& b, size_t n) {
    std::vector<T> y(x.size());
    emu::launch(elems_cfg(x.size()), block, k, x.data(), b.data(), y.data(), size_t(x.size()),
                int(n));
    return y;
}

// The float32 column totals (before any rounding to T).
template <class T>
Vec run_column_total(void (*k)(const T*, float*, int, int), const std::vector<T>& x, size_t n) {
    size_t rows = x.size() / n;
    auto [cfg, chunks] = columns_cfg(rows, n);
    Vec partial(chunks * n), total(n);
    emu::launch(cfg, block, k, x.data(), partial.data(), int(rows), int(n));
    sum_chunks(partial, total.data(), chunks, n);
    return total;
}

Vec activation(const Vec& x, int act) { return run_act(vl_act_fwd, x, act); }
Vec activation_bwd(const Vec& x, const Vec& dy, int act) { return run_act_bwd(vl_act_bwd, x, dy, act); }
Vec add_bias(const Vec& x, const Vec& b, size_t n) { return run_add_bias(vl_add_bias, x, b, n); }
Vec column_sum(const Vec& x, size_t n) { return run_column_total(vl_column_sum_partial, x, n); }

// The bfloat16 kernels.
using Hv = std::vector<bf16_bits>;

Hv activation_bf16(const Hv& x, int act) { return run_act(vl_act_fwd_bf16, x, act); }
Hv activation_bwd_bf16(const Hv& x, const Hv& dy, int act) {
    return run_act_bwd(vl_act_bwd_bf16, x, dy, act);
}
Hv add_bias_bf16(const Hv& x, const Hv& b, size_t n) {
    return run_add_bias(vl_add_bias_bf16, x, b, n);
}
Hv column_sum_bf16(const Hv& x, size_t n) {
    Vec total = run_column_total(vl_column_sum_partial_bf16, x, n);
    Hv out(n);
    emu::launch(elems_cfg(n), block, vl_round_bf16, total.data(), out.data(), size_t(n));
    return out;
}

// Attention probabilities from bf16 scores [B·H·Tq, n] with an optional [B, Tq, n] mask.
Hv attn_softmax_bf16(const Hv& x, const Vec* mask, size_t n, float scale, size_t heads, size_t q_len) {
    Hv y(x.size());
    emu::launch(rows_cfg(x.size() / n), block, vl_attn_softmax_fwd_bf16, x.data(),
                mask ? mask->data() : (const float*)nullptr, y.data(), int(n), scale,
                int(heads * q_len), int(q_len));
    return y;
}

Hv attn_softmax_bwd_bf16(const Hv& x, const Vec* mask, const Hv& dy, size_t n, float scale,
                         size_t heads, size_t q_len) {
    Hv dx(x.size());
    emu::launch(rows_cfg(x.size() / n), block, vl_attn_softmax_bwd_bf16, x.data(),
                mask ? mask->data() : (const float*)nullptr, dy.data(), dx.data(), int(n), scale,
                int(heads * q_len), int(q_len));
    return dx;
}

// ---- references, in double, from the definitions -------------------------------------------

using Dv = std::vector<double>;

Dv ln_row(const double* x, const float* w, const float* b, size_t n, double eps) {
    double mean = 0, var = 0;
    for (size_t i = 0; i < n; ++i) mean += x[i];
    mean /= n;
    for (size_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    var /= n;
    Dv y(n);
    for (size_t i = 0; i < n; ++i) y[i] = (x[i] - mean) / std::sqrt(var + eps) * w[i] + b[i];
    return y;
}

Dv softmax_row(const double* x, size_t n) {
    double m = -INFINITY, s = 0;
    for (size_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    Dv y(n);
    for (size_t i = 0; i < n; ++i) s += y[i] = std::exp(x[i] - m);
    for (auto& v : y) v /= s;
    return y;
}

double act_ref(int act, double x) {
    if (act == 0) return x / (1.0 + std::exp(-1.702 * x));
    return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
}

// d/dx_j of Σ_i dy_i f(x)_i for every j of a row, by central differences of `f` in double.
template <class F>
Dv fd_grad(const float* xr, const float* dyr, size_t n, F f) {
    Dv x(xr, xr + n), g(n);
    auto loss = [&] {
        Dv y = f(x.data());
        double l = 0;
        for (size_t i = 0; i < n; ++i) l += dyr[i] * y[i];
        return l;
    };
    for (size_t j = 0; j < n; ++j) {
        double h = 1e-6 * std::max(1.0, std::abs(x[j])), keep = x[j];
        x[j] = keep + h;
        double up = loss();
        x[j] = keep - h;
        double down = loss();
        x[j] = keep;
        g[j] = (up - down) / (2 * h);
    }
    return g;
}

// The bfloat16 nearest to `f`, ties to the even one, found by comparing the two candidates
// around it in double (independent of fused.cu's bit trick): NaN stays NaN, ±inf ±inf.
bf16_bits nearest_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if (std::isnan(f)) return bf16_bits((u >> 16) | 0x40);
    unsigned lo = u & 0xffff0000u, hi = lo + 0x10000u;  // toward zero, away from zero
    if (std::isinf(f) || u == lo) return bf16_bits(lo >> 16);
    // Past the largest finite bf16 the next step is 2^128 (IEEE rounds there to infinity).
    double up = (hi & 0x7fffffffu) == 0x7f800000u ? std::copysign(std::ldexp(1.0, 128), double(f))
                                                 : double(__uint_as_float(hi));
    double dl = std::abs(double(f) - double(__uint_as_float(lo)));
    double dh = std::abs(up - double(f));
    if (dl < dh || (dl == dh && ((lo >> 16) & 1) == 0)) return bf16_bits(lo >> 16);
    return bf16_bits(hi >> 16);
}

double widen(bf16_bits h) { return __uint_as_float(unsigned(h) << 16); }

// The spacing of bfloat16 numbers at |v| (8 significant bits; subnormal below 2^-126).
double bf16_ulp(double v) {
    int e = v == 0 ? -126 : std::max(int(std::floor(std::log2(std::abs(v)))), -126);
    return std::ldexp(1.0, e - 7);
}

// ---- comparison -----------------------------------------------------------------------------

int failures = 0;

// max |got − ref| over max(1, max |ref|), reported and checked against `tol`.
void compare(const char* what, size_t rows, size_t n, const float* got, const Dv& ref, double tol) {
    double diff = 0, scale = 1;
    for (size_t i = 0; i < ref.size(); ++i) {
        if (!std::isfinite(got[i])) diff = INFINITY;
        diff = std::max(diff, std::abs(double(got[i]) - ref[i]));
        scale = std::max(scale, std::abs(ref[i]));
    }
    double rel = diff / scale;
    bool ok = rel <= tol;
    failures += !ok;
    std::printf("%s %-22s rows %4zu n %5zu  rel diff %.2e (<= %.0e)\n", ok ? "ok  " : "FAIL", what,
                rows, n, rel, tol);
}

// A bfloat16 result against the exact value: within half a bfloat16 step of it, and
// `slack` more (float32 arithmetic before the one rounding). Reported in steps.
void compare_bf16(const char* what, size_t rows, size_t n, const Hv& got, const Dv& exact,
                  const Dv& slack) {
    double worst = 0;
    for (size_t i = 0; i < exact.size(); ++i) {
        double g = widen(got[i]), e = std::abs(g - exact[i]) - slack[i];
        if (!std::isfinite(g)) e = INFINITY;
        worst = std::max(worst, e / bf16_ulp(exact[i]));
    }
    bool ok = worst <= 0.5;
    failures += !ok;
    std::printf("%s %-22s rows %4zu n %5zu  off by %.3f bf16 steps (<= 0.5)\n", ok ? "ok  " : "FAIL",
                what, rows, n, worst);
}

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
float uniform(float lo, float hi) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    double u = double(rng_state >> 11) / double(1ull << 53);
    return float(lo + (hi - lo) * u);
}
Vec random_vec(size_t len, float lo, float hi) {
    Vec v(len);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
}

// LayerNorm forward and backward; `bf16`: the mixed-precision pair — a bfloat16 output (within
// half a bfloat16 step of the exact value, and float32's error before the rounding) and a
// bfloat16 dy (the references take its values; dx, dw and db are float32 as ever).
void check_layer_norm(size_t rows, size_t n, bool bf16 = false) {
    const float eps = 1e-5f;
    Vec x = random_vec(rows * n, -3, 3), w = random_vec(n, 0.5, 1.5), b = random_vec(n, -1, 1);
    Vec dy = random_vec(rows * n, -1, 1);
    std::vector<bf16_bits> dy16(dy.size());
    if (bf16)
        for (size_t i = 0; i < dy.size(); ++i) dy[i] = float(widen(dy16[i] = nearest_bf16(dy[i])));
    if (rows > 1)
        for (size_t i = 0; i < n; ++i) x[n + i] = 0.25f;  // a constant row: variance 0
    Vec out = bf16 ? layer_norm_bwd_t(vl_layer_norm_bwd_dx_bf16, vl_layer_norm_bwd_partial_bf16, x,
                                      w, dy16, n, eps)
                   : layer_norm_bwd(x, w, dy, n, eps);
    Dv ry, rdx, rdw(n, 0.0), rdb(n, 0.0);
    for (size_t r = 0; r < rows; ++r) {
        Dv xr(x.begin() + r * n, x.begin() + (r + 1) * n);
        Dv yr = ln_row(xr.data(), w.data(), b.data(), n, eps);
        ry.insert(ry.end(), yr.begin(), yr.end());
        Dv g = fd_grad(&x[r * n], &dy[r * n], n,
                       [&](const double* v) { return ln_row(v, w.data(), b.data(), n, eps); });
        rdx.insert(rdx.end(), g.begin(), g.end());
        // y = xhat·w + b: ∂/∂w_i = xhat_i (the output with w = 1, b = 0), ∂/∂b_i = 1.
        Vec ones(n, 1.0f), zeros(n, 0.0f);
        Dv xhat = ln_row(xr.data(), ones.data(), zeros.data(), n, eps);
        for (size_t i = 0; i < n; ++i) {
            rdw[i] += dy[r * n + i] * xhat[i];
            rdb[i] += dy[r * n + i];
        }
    }
    if (bf16) {
        // float32's error before the one rounding: ~1e-6 of the output's scale (|y| ≲ 6 here).
        Dv slack(ry.size());
        for (size_t i = 0; i < ry.size(); ++i) slack[i] = 1e-5 * (1 + std::abs(ry[i]));
        compare_bf16("layer_norm bf16 fwd", rows, n, layer_norm_bf16(x, w, b, n, eps), ry, slack);
    } else {
        compare("layer_norm forward", rows, n, layer_norm(x, w, b, n, eps).data(), ry, 1e-5);
    }
    compare(bf16 ? "layer_norm bf16 dx" : "layer_norm dx", rows, n, out.data(), rdx, 1e-4);
    compare(bf16 ? "layer_norm bf16 dw" : "layer_norm dw", rows, n, out.data() + rows * n, rdw,
            1e-4);
    compare(bf16 ? "layer_norm bf16 db" : "layer_norm db", rows, n, out.data() + rows * n + n, rdb,
            1e-4);
}

void check_softmax(size_t rows, size_t n) {
    Vec x = random_vec(rows * n, -6, 6), dy = random_vec(rows * n, -1, 1);
    // Masked scores as nn::attention writes them (f32::MIN): one entry of row 0, all of row 1.
    x[0] = -3.4028235e38f;
    if (rows > 1)
        for (size_t i = 0; i < n; ++i) x[n + i] = -3.4028235e38f;
    Vec y = softmax(x, n), dx = softmax_bwd(y, dy, n);
    Dv ry, rdx;
    for (size_t r = 0; r < rows; ++r) {
        Dv xr(x.begin() + r * n, x.begin() + (r + 1) * n);
        Dv yr = softmax_row(xr.data(), n);
        ry.insert(ry.end(), yr.begin(), yr.end());
        // Finite differences of the forward, but for the fully masked row, where a step of
        // 1e-6·|x| is itself ~1e32: there the definition y ⊙ (dy − Σ dy ⊙ y) with uniform y.
        if (r != 1 || rows == 1) {
            Dv g = fd_grad(&x[r * n], &dy[r * n], n, [&](const double* v) { return softmax_row(v, n); });
            rdx.insert(rdx.end(), g.begin(), g.end());
        } else {
            double s = 0;
            for (size_t i = 0; i < n; ++i) s += double(dy[r * n + i]) * yr[i];
            for (size_t i = 0; i < n; ++i) rdx.push_back(yr[i] * (dy[r * n + i] - s));
        }
    }
    compare("softmax forward", rows, n, y.data(), ry, 1e-5);
    compare("softmax dx", rows, n, dx.data(), rdx, 1e-4);
}

void check_activation(size_t len, int act) {
    Vec x = random_vec(len, -6, 6), dy = random_vec(len, -1, 1);
    if (len > 2) x[1] = 0.0f, x[2] = -30.0f;
    Vec y = activation(x, act), dx = activation_bwd(x, dy, act);
    Dv ry(len), rdx(len);
    for (size_t i = 0; i < len; ++i) {
        ry[i] = act_ref(act, x[i]);
        double h = 1e-6 * std::max(1.0, std::abs(double(x[i])));
        rdx[i] = dy[i] * (act_ref(act, x[i] + h) - act_ref(act, x[i] - h)) / (2 * h);
    }
    const char* names[2][2] = {{"quick_gelu forward", "quick_gelu dx"}, {"gelu forward", "gelu dx"}};
    compare(names[act][0], 1, len, y.data(), ry, 1e-5);
    compare(names[act][1], 1, len, dx.data(), rdx, 1e-4);
}

void check_bias_and_column_sum(size_t rows, size_t n) {
    Vec x = random_vec(rows * n, -2, 2), b = random_vec(n, -1, 1);
    Vec y = add_bias(x, b, n), s = column_sum(x, n);
    Dv ry(rows * n), rs(n, 0.0);
    for (size_t i = 0; i < rows * n; ++i) {
        ry[i] = double(x[i] + b[i % n]);  // the float sum itself: exact
        rs[i % n] += x[i];
    }
    compare("add_bias", rows, n, y.data(), ry, 0.0);
    // A column sum of `rows` terms of magnitude ≤ 2, relative to that bound.
    Dv scaled(rs);
    Vec got(s);
    for (size_t j = 0; j < n; ++j) scaled[j] /= 2.0 * rows, got[j] /= 2.0f * rows;
    compare("column_sum", rows, n, got.data(), scaled, 1e-6);
}

Hv random_bf16(size_t len, float lo, float hi) {
    Hv v(len);
    for (auto& x : v) x = nearest_bf16(uniform(lo, hi));
    return v;
}

// fused.cu's float → bf16 rounding against nearest_bf16, on special values and a sweep of bit
// patterns (every 4099th of the 2^32, and each around a tie).
void check_rounding() {
    size_t bad = 0, total = 0;
    auto one = [&](unsigned u) {
        float f = __uint_as_float(u);
        bf16_bits got = float_to_bf16(f), want = nearest_bf16(f);
        ++total;
        if (std::isnan(f) ? !std::isnan(widen(got)) : got != want) {
            if (bad++ < 5) std::printf("  rounding of %08x: %04x, nearest %04x\n", u, got, want);
        }
    };
    for (unsigned u : {0u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffffffffu,
                       0x7f7fffffu, 0x7f7f8000u, 0x00000001u, 0x00008000u, 0x00018000u, 0x3f808000u,
                       0x3f818000u})
        one(u);
    for (uint64_t u = 0; u < (1ull << 32); u += 4099) {
        one(unsigned(u));
        one((unsigned(u) & 0xffff0000u) | 0x8000u);  // exactly halfway
    }
    failures += bad != 0;
    std::printf("%s float -> bf16 rounding    %zu values, %zu not the nearest (ties to even)\n",
                bad ? "FAIL" : "ok  ", total, bad);
}

void check_activation_bf16(size_t len, int act) {
    Hv x = random_bf16(len, -6, 6), dy = random_bf16(len, -1, 1);
    if (len > 2) x[1] = 0, x[2] = nearest_bf16(-30.0f);
    Hv y = activation_bf16(x, act), dx = activation_bwd_bf16(x, dy, act);
    Dv ry(len), rdx(len), slack(len), dslack(len);
    for (size_t i = 0; i < len; ++i) {
        double xi = widen(x[i]), h = 1e-6 * std::max(1.0, std::abs(xi));
        ry[i] = act_ref(act, xi);
        rdx[i] = widen(dy[i]) * (act_ref(act, xi + h) - act_ref(act, xi - h)) / (2 * h);
        // float32's error before the rounding: relative to the value for act(x); for the
        // derivative, relative to its terms (of order 1 + |x|: gelu' = Φ + xφ cancels near -0.75).
        slack[i] = 1e-6 * std::abs(ry[i]);
        dslack[i] = 1e-6 * std::abs(widen(dy[i])) * (1 + std::abs(xi));
    }
    const char* names[2][2] = {{"quick_gelu bf16", "quick_gelu bf16 dx"}, {"gelu bf16", "gelu bf16 dx"}};
    compare_bf16(names[act][0], 1, len, y, ry, slack);
    compare_bf16(names[act][1], 1, len, dx, rdx, dslack);
}

void check_bias_and_column_sum_bf16(size_t rows, size_t n) {
    Hv x = random_bf16(rows * n, -2, 2), b = random_bf16(n, -1, 1);
    Hv y = add_bias_bf16(x, b, n), s = column_sum_bf16(x, n);
    Dv ry(rows * n), rs(n, 0.0), abs_sum(n, 0.0);
    for (size_t i = 0; i < rows * n; ++i) {
        ry[i] = widen(x[i]) + widen(b[i % n]);
        rs[i % n] += widen(x[i]);
        abs_sum[i % n] += std::abs(widen(x[i]));
    }
    Dv tiny(rows * n), sum_slack(n);
    // x + b is exact in float32 unless their exponents are far apart: 2^-24 of it otherwise.
    for (size_t i = 0; i < rows * n; ++i) tiny[i] = std::ldexp(std::abs(ry[i]), -24);
    // float32 accumulation: each of the `rows` additions may round by 2^-24 of the partial sum.
    for (size_t j = 0; j < n; ++j) sum_slack[j] = rows * std::ldexp(abs_sum[j], -24);
    compare_bf16("add_bias bf16", rows, n, y, ry, tiny);
    compare_bf16("column_sum bf16", rows, n, s, rs, sum_slack);
}

// Scores of `batch` × `heads` × `q_len` rows of n, bf16; with a mask, entries past q + b are
// blocked (nn::attention::MASKED) and the others get a random bias, and row q = 0 of batch 0
// is blocked whole (a uniform row, as the composition gives).
void check_attn_softmax_bf16(size_t batch, size_t heads, size_t q_len, size_t n, bool masked) {
    const float blocked = -3.4028235e38f, scale = 0.125f;
    size_t rows = batch * heads * q_len;
    Hv x = random_bf16(rows * n, -8, 8), dy = random_bf16(rows * n, -1, 1);
    Vec mask(batch * q_len * n);
    for (size_t b = 0; b < batch; ++b)
        for (size_t q = 0; q < q_len; ++q)
            for (size_t k = 0; k < n; ++k)
                mask[(b * q_len + q) * n + k] =
                    (k > q + b || (b == 0 && q == 0)) ? blocked : uniform(-1, 1);
    const Vec* m = masked ? &mask : nullptr;
    Hv y = attn_softmax_bf16(x, m, n, scale, heads, q_len);
    Hv dx = attn_softmax_bwd_bf16(x, m, dy, n, scale, heads, q_len);
    Dv ry(rows * n), rdx(rows * n), sy(rows * n), sdx(rows * n);
    for (size_t r = 0; r < rows; ++r) {
        size_t mrow = (r / (heads * q_len)) * q_len + r % q_len;
        // z = scale·x + mask as float32 forms it (a masked entry is the mask itself), then the
        // softmax and its gradient in double.
        Dv z(n);
        for (size_t k = 0; k < n; ++k)
            z[k] = double(scale * float(widen(x[r * n + k])) + (m ? mask[mrow * n + k] : 0.0f));
        Dv p = softmax_row(z.data(), n);
        double d = 0, dabs = 0;
        for (size_t k = 0; k < n; ++k) {
            d += widen(dy[r * n + k]) * p[k];
            dabs += std::abs(widen(dy[r * n + k])) * p[k];
        }
        for (size_t k = 0; k < n; ++k) {
            double g = widen(dy[r * n + k]);
            ry[r * n + k] = p[k];
            rdx[r * n + k] = scale * p[k] * (g - d);
            // float32's error before the one rounding: exp of |z| up to ~10, sums of n terms.
            sy[r * n + k] = 2e-5 * p[k];
            sdx[r * n + k] = 2e-5 * scale * p[k] * (std::abs(g) + dabs);
        }
    }
    compare_bf16(masked ? "attn softmax bf16 mask" : "attn softmax bf16", rows, n, y, ry, sy);
    compare_bf16(masked ? "attn softmax bf16 m dx" : "attn softmax bf16 dx", rows, n, dx, rdx, sdx);
}

// fused_cuda.rs's adamw_moment and adamw_step (in place, over elems_cfg(len)), with the f32
// arguments train/adamw_fused.rs derives from its f64 settings.
void adamw_moment(Vec& m, const Vec& g, double beta, bool square) {
    emu::launch(elems_cfg(m.size()), block, vl_adamw_moment, m.data(), g.data(), size_t(m.size()),
                float(beta), float(1.0 - beta), int(square));
}

void adamw_step(Vec& theta, const Vec& m, const Vec& v, bool decayed, double decay, double inv,
                double eps, double rate) {
    emu::launch(elems_cfg(theta.size()), block, vl_adamw_step, theta.data(), m.data(), v.data(),
                size_t(theta.size()), int(decayed), float(decay), float(inv), float(eps),
                float(rate));
}

// Elements whose bits differ (a -0 against a +0 counts).
void compare_bits(const char* what, const Vec& got, const Vec& want) {
    size_t differ = 0;
    for (size_t i = 0; i < got.size(); ++i) differ += __float_as_uint(got[i]) != __float_as_uint(want[i]);
    failures += differ != 0;
    std::printf("%s %-22s rows    1 n %5zu  %zu element(s) with other bits (== 0)\n",
                differ ? "FAIL" : "ok  ", what, got.size(), differ);
}

// AdamW: three updates by the kernels, each held (1) bit for bit to the CPU kernels' arithmetic,
// transcribed here from train/adamw_fused.rs's `Moment` and `Step`, and (2) to
// torch.optim.AdamW's update in double from the same float32 state: the moments within 1e-6 and
// the change of θ within 1e-5 of their largest magnitudes. Zero gradients (both signs) and a
// second moment that stays 0 (the step's denominator is ε alone) are among the elements.
void check_adamw(size_t len, bool decayed) {
    const double lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
    Vec theta = random_vec(len, -2, 2), m(len, 0.0f), v(len, 0.0f);
    Vec ct = theta, cm = m, cv = v;
    // Each step's results and references, one after another (the "rows" of the report).
    Vec got_m, got_v, got_d;
    Dv ref_m, ref_v, ref_d;
    for (int t = 1; t <= 3; ++t) {
        Vec g = random_vec(len, -1, 1);
        if (len > 2) g[0] = 0.0f, g[1] = -0.0f;
        // optim.rs's settings of the step.
        double bc1 = 1.0 - std::pow(b1, t), bc2_sqrt = std::sqrt(1.0 - std::pow(b2, t));
        double decay = 1.0 - lr * wd, inv = 1.0 / bc2_sqrt, rate = lr / bc1;
        // The reference from this step's starting state.
        for (size_t i = 0; i < len; ++i) {
            double gi = g[i];
            double rm = b1 * m[i] + (1 - b1) * gi, rv = b2 * v[i] + (1 - b2) * gi * gi;
            double shrunk = decayed ? theta[i] * (1 - lr * wd) : double(theta[i]);
            ref_m.push_back(rm);
            ref_v.push_back(rv);
            ref_d.push_back(shrunk - lr / bc1 * rm / (std::sqrt(rv) / bc2_sqrt + eps) - theta[i]);
        }
        Vec before = theta;
        adamw_moment(m, g, b1, false);
        adamw_moment(v, g, b2, true);
        adamw_step(theta, m, v, decayed, decay, inv, eps, rate);
        got_m.insert(got_m.end(), m.begin(), m.end());
        got_v.insert(got_v.end(), v.begin(), v.end());
        for (size_t i = 0; i < len; ++i) got_d.push_back(float(double(theta[i]) - before[i]));
        // adamw_fused.rs's CPU arithmetic (f32 throughout, `+ 0.0` where it has them).
        const float fb1 = float(b1), fc1 = float(1.0 - b1), fb2 = float(b2), fc2 = float(1.0 - b2);
        for (size_t i = 0; i < len; ++i) {
            cm[i] = (cm[i] * fb1 + 0.0f) + (g[i] * fc1 + 0.0f);
            float g2 = g[i] * g[i];
            cv[i] = (cv[i] * fb2 + 0.0f) + (g2 * fc2 + 0.0f);
            float decayed_t = decayed ? ct[i] * float(decay) + 0.0f : ct[i];
            float denom = (std::sqrt(cv[i]) * float(inv) + 0.0f) * 1.0f + float(eps);
            ct[i] = decayed_t - ((cm[i] / denom) * float(rate) + 0.0f);
        }
    }
    compare(decayed ? "adamw m (decayed)" : "adamw m", 3, len, got_m.data(), ref_m, 1e-6);
    compare("adamw v", 3, len, got_v.data(), ref_v, 1e-6);
    compare("adamw change of theta", 3, len, got_d.data(), ref_d, 1e-5);
    compare_bits("adamw m = CPU bits", m, cm);
    compare_bits("adamw v = CPU bits", v, cv);
    compare_bits("adamw theta = CPU bits", theta, ct);
}

// fused_cuda.rs's sumsq: block partials over sumsq_cfg(len), then their ordered total added
// to `total_in` by one thread (of one block).
double sumsq(const Vec& g, double total_in) {
    dim3 grid = sumsq_cfg(g.size());
    std::vector<double> partial(grid.x), in{total_in}, out(1);
    emu::launch(grid, block, vl_sumsq_partial, g.data(), size_t(g.size()), partial.data());
    emu::launch(dim3{1, 1, 1}, block, vl_sumsq_total, (const double*)partial.data(), int(grid.x),
                (const double*)in.data(), out.data());
    return out[0];
}

// The gradient norm's sum of squares: total_in + Σ g² against the sum in long double (every
// square of a float is exact in double; the kernels' float64 additions leave ~len·2^-53).
void check_sumsq(size_t len) {
    Vec g = random_vec(len, -3, 3);
    const double before = 0.75;
    long double exact = before;
    for (float x : g) exact += (long double)x * x;
    double got = sumsq(g, before);
    double rel = std::abs((long double)got - exact) / exact;
    bool ok = rel <= 1e-12 && std::isfinite(got);
    failures += !ok;
    std::printf("%s %-22s rows    1 n %5zu  rel diff %.2e (<= 1e-12)\n", ok ? "ok  " : "FAIL",
                "sumsq (gradient norm)", len, double(rel));
}

// Mixed precision's residual add (fused_cuda.rs add_widened): the float32 sum of x and the
// widened bfloat16 h, exactly as float32 adds them.
void check_residual_add_bf16(size_t len) {
    Vec x = random_vec(len, -4, 4);
    Hv h = random_bf16(len, -4, 4);
    Vec y(len);
    emu::launch(elems_cfg(len), block, vl_add_widened_bf16, x.data(), (const bf16_bits*)h.data(),
                y.data(), size_t(len));
    Dv ref(len);
    for (size_t i = 0; i < len; ++i) ref[i] = double(x[i] + float(widen(h[i])));
    compare("residual add bf16", 1, len, y.data(), ref, 0.0);
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a line at a time, also into a CI log
    check_rounding();
    // Rows of 1 and of fewer, exactly, and more elements than a warp or a block, and more rows
    // than one column-sum chunk (64): two and three chunks. (Each row of a row kernel costs
    // thousands of thread switches here, so the row counts stay small.)
    const std::pair<size_t, size_t> shapes[] = {{1, 1},  {3, 5},   {2, 31},  {4, 32},   {3, 33},
                                                {5, 256}, {65, 257}, {2, 768}, {7, 1000}, {129, 50}};
    // EMU_QUICK=1 (the ThreadSanitizer pass, ~10× slower): three shapes and the stride pass.
    const bool quick = std::getenv("EMU_QUICK") != nullptr;
    for (auto [rows, n] : shapes) {
        if (quick && !(n == 1 || n == 33 || n == 257)) continue;
        check_layer_norm(rows, n);
        check_layer_norm(rows, n, true);
        check_softmax(rows, n);
        check_bias_and_column_sum(rows, n);
        check_bias_and_column_sum_bf16(rows, n);
    }
    for (size_t len : {1ul, 255ul, 256ul, 257ul, 5000ul}) {
        if (quick && len != 257) continue;
        check_activation(len, 0);
        check_activation(len, 1);
        check_activation_bf16(len, 0);
        check_activation_bf16(len, 1);
        check_adamw(len, len % 2 == 1);
        check_sumsq(len);
        check_residual_add_bf16(len);
    }
    // More than sumsq_cfg's 1024 blocks of 256: each thread takes several elements.
    if (!quick) check_sumsq(300000);
    // Attention rows: ViT-like (no mask, 50 keys), text-like (causal + padding, 77 keys), and
    // more keys than a block has threads.
    check_attn_softmax_bf16(2, 3, 5, 50, false);
    check_attn_softmax_bf16(2, 2, 7, 77, true);
    if (!quick) check_attn_softmax_bf16(1, 2, 3, 300, true);
    // The grid-stride loops with fewer blocks than elements need (elems_cfg caps the grid at 65,536
    // blocks, columns_cfg the row-chunk slots at 65,535; caps of 2 and 1 make each thread take
    // several elements — 768 columns on 512 threads — and each slot several chunks).
    max_elem_blocks = 2;
    max_chunk_slots = 1;
    check_activation(5000, 0);
    check_activation(5000, 1);
    check_bias_and_column_sum(130, 768);
    check_bias_and_column_sum_bf16(130, 768);
    check_activation_bf16(5000, 0);
    check_adamw(5000, true);
    max_sumsq_blocks = 2;
    check_sumsq(5000);
    check_residual_add_bf16(5000);
    check_layer_norm(65, 40);
    check_layer_norm(65, 40, true);
    if (failures) {
        std::printf("%d check(s) FAILED\n", failures);
        return 1;
    }
    std::printf("all fused.cu kernels match the references\n");
    return 0;
}
