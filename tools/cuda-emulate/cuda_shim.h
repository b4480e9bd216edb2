// Just enough of CUDA's execution model to run src/nn/fused.cu on a CPU, so that its kernels can
// be checked on a machine without a GPU (tools/check-fused-cu.sh). Each block of a launch runs
// alone; its threads are real threads (std::thread), so `__syncthreads` is a barrier among them
// and `__shared__` memory is one array they all see. A warp shuffle is an exchange through a
// per-thread slot between two barriers of the warp's 32 threads only — no more ordering than
// the hardware gives, so that ThreadSanitizer sees a missing `__syncthreads` around shared
// memory as the race it is. A thread that returns drops out of later barriers, as an exited
// thread does on the GPU.
//
// What this cannot show: timing, the memory model of real hardware (the barriers here are full
// fences), and the launch side in fused_cuda.rs (argument types, grid sizes), which
// check_fused.cpp mirrors by hand.
#pragma once

#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
/// One barrier per warp of the running block, for its shuffles.
inline std::vector<std::barrier<>*> warp_barriers;
/// One slot per thread of the block for warp shuffles.
inline std::vector<double> shuffle_slots;  // a float travels exactly
}  // namespace emu

#define __global__
#define __device__
// One array per kernel, shared by the running block's threads; blocks run one at a time.
#define __shared__ static

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    if (mask != 0xffffffffu) {
        std::fprintf(stderr, "emulator: only full-mask shuffles are modelled\n");
        std::abort();
    }
    unsigned me = threadIdx.x;
    unsigned other = me ^ static_cast<unsigned>(lane_mask);
    // Lanes exchange within their warp: the partner must be in the same warp and the block.
    if ((other >> 5) != (me >> 5) || other >= blockDim.x) {
        std::fprintf(stderr, "emulator: shuffle partner %u of thread %u outside its warp\n", other, me);
        std::abort();
    }
    std::barrier<>* warp = emu::warp_barriers[me >> 5];
    emu::shuffle_slots[me] = v;
    warp->arrive_and_wait();
    T r = T(emu::shuffle_slots[other]);
    warp->arrive_and_wait();
    return r;
}

inline float __int_as_float(int bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline float __int_as_float(unsigned bits) { return __int_as_float(static_cast<int>(bits)); }

inline float __uint_as_float(unsigned bits) { return __int_as_float(bits); }

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// IEEE single-precision operations rounded to nearest one at a time, as CUDA's `_rn` intrinsics
// (check-fused-cu.sh compiles with -ffp-contract=off, so none becomes a fused multiply-add).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

// erff, expf, fmaxf: the C library's (math.h); min over ints as CUDA's.
using std::min;

namespace emu {
/// The threads that run a block: started once, reused for every block of every launch.
class Pool {
  public:
    explicit Pool(unsigned n) : n_(n), start_(n + 1), done_(n + 1) {
        for (unsigned t = 0; t < n; ++t) threads_.emplace_back([this, t] { work(t); });
    }
    ~Pool() {
        quit_ = true;
        start_.arrive_and_wait();
        for (auto& th : threads_) th.join();
    }
    unsigned size() const { return n_; }
    /// Runs `job(t)` on thread t for every t, and returns when all have.
    void run(std::function<void(unsigned)> job) {
        job_ = std::move(job);
        start_.arrive_and_wait();
        done_.arrive_and_wait();
    }

  private:
    void work(unsigned t) {
        for (;;) {
            start_.arrive_and_wait();
            if (quit_) return;
            job_(t);
            done_.arrive_and_wait();
        }
    }
    unsigned n_;
    std::barrier<> start_, done_;
    std::function<void(unsigned)> job_;
    bool quit_ = false;
    std::vector<std::thread> threads_;
};

/// The one pool, of as many threads as the first launch's block.
inline Pool& pool_of(unsigned n) {
    static Pool pool(n);
    return pool;
}

/// Runs `kernel(args...)` over `grid` blocks of `block` threads (x and y only), block after block.
template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
    Pool& pool = pool_of(block.x);
    if (block.y != 1 || block.z != 1 || grid.z != 1 || block.x != pool.size()) {
        std::fprintf(stderr, "emulator: only 1-D blocks of one size and 2-D grids are modelled\n");
        std::abort();
    }
    gridDim = grid;
    blockDim = block;
    shuffle_slots.assign(block.x, 0.0);
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> bar(block.x);
            std::vector<std::unique_ptr<std::barrier<>>> warps;
            warp_barriers.clear();
            for (unsigned w = 0; w * 32 < block.x; ++w) {
                warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, block.x - w * 32)));
                warp_barriers.push_back(warps.back().get());
            }
            block_barrier = &bar;
            pool.run([&](unsigned t) {
                threadIdx = dim3{t, 0, 0};
                blockIdx = dim3{bx, by, 0};
                kernel(static_cast<Params>(args)...);
                bar.arrive_and_drop();
                warp_barriers[t >> 5]->arrive_and_drop();
            });
            block_barrier = nullptr;
        }
    }
}
}  // namespace emu
