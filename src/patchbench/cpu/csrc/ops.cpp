// patchbench's CPU kernels as torch operators (torch.ops.patchbench.*): every input checked here,
// the work shared out over torch's own threads (at::parallel_for, so torch.set_num_threads governs
// it), and the arithmetic of kernels.h compiled once per instruction set and chosen when called by
// what this CPU has (GCC on x86-64; elsewhere the portable build only).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PB_MULTI_ISA 1
#include <immintrin.h>
#else
#define PB_MULTI_ISA 0
#endif

#define PB_AVX2 0
#define PB_AVX512 0
#define PB_AVX512BF16 0
namespace generic {
#include "kernels.h"
}
#if PB_MULTI_ISA
#undef PB_AVX2
#define PB_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kernels.h"
}
#pragma GCC pop_options
#undef PB_AVX512
#define PB_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#include "kernels.h"
}
#pragma GCC pop_options
#undef PB_AVX512BF16
#define PB_AVX512BF16 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
namespace avx512bf16 {
#include "kernels.h"
}
#pragma GCC pop_options
#endif

namespace {

// ---------------------------------------------------------------------------------- instruction sets

const char *const ISA_NAMES[] = {"generic", "avx2", "avx512", "avx512bf16"};
enum Isa { GENERIC = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3 };

int best_isa() {
#if PB_MULTI_ISA
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return GENERIC;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
        return AVX2;
    return __builtin_cpu_supports("avx512bf16") ? AVX512BF16 : AVX512;
#else
    return GENERIC;
#endif
}

std::atomic<int> isa_cap{AVX512BF16};

int isa() {
    static const int best = best_isa();
    return std::min(best, isa_cap.load());
}

// Runs the statement with `k` naming the namespace of the instruction set in use.
#if PB_MULTI_ISA
#define PB_DISPATCH(...)                                                \
    switch (isa()) {                                                    \
        case AVX512BF16: { namespace k = avx512bf16; __VA_ARGS__; break; } \
        case AVX512: { namespace k = avx512; __VA_ARGS__; break; }      \
        case AVX2: { namespace k = avx2; __VA_ARGS__; break; }          \
        default: { namespace k = generic; __VA_ARGS__; }                \
    }
#else
#define PB_DISPATCH(...) { namespace k = generic; __VA_ARGS__; }
#endif

// The instruction set the kernels use; `cap` (when given) limits it from now on ("generic", "avx2",
// "avx512", "avx512bf16"), to compare them or to run as a CPU with fewer would.
std::string cpu_isa(std::string cap) {
    if (!cap.empty()) {
        auto it = std::find(std::begin(ISA_NAMES), std::end(ISA_NAMES), cap);
        TORCH_CHECK(it != std::end(ISA_NAMES), "cpu_isa: cap is '", cap,
                    "', not one of generic, avx2, avx512, avx512bf16");
        isa_cap = static_cast<int>(it - std::begin(ISA_NAMES));
    }
    return ISA_NAMES[isa()];
}

// -------------------------------------------------------------------------------------------- threads

std::atomic<uint64_t> threads_seen{0};

// f(lo, hi) over [0, n) shared out in contiguous ranges over torch's threads; records which ran.
template <typename F>
void parallel(int64_t n, const F &f) {
    threads_seen = 0;
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
        threads_seen |= uint64_t{1} << (at::get_thread_num() & 63);
        f(lo, hi);
    });
}

// How many of torch's threads ran the last kernel called.
int64_t threads_used() { return __builtin_popcountll(threads_seen.load()); }

// --------------------------------------------------------------------------------------------- checks

void check_cpu(const at::Tensor &t, const char *op, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

// A (B, C, H, W) float32 or bfloat16 CPU tensor, C a multiple of 16, in channels_last memory if asked.
void check_activation(const at::Tensor &t, const char *op, const char *name, bool channels_last) {
    check_cpu(t, op, name);
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, C, H, W), got ", t.dim(), "-D");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
                " must be float32 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.size(1) > 0 && t.size(1) % 16 == 0, op, ": ", name, " must have a positive multiple of 16 channels, got ",
                t.size(1));
    TORCH_CHECK(!channels_last || t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
                " must be contiguous in channels_last memory format (x.contiguous(memory_format=torch.channels_last))");
}

void check_like(const at::Tensor &t, const at::Tensor &ref, const char *op, const char *name, const char *ref_name) {
    check_cpu(t, op, name);
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name, "'s dtype (",
                ref.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have ", ref_name, "'s shape ", ref.sizes(), ", got ",
                t.sizes());
    TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
                " must be contiguous in channels_last memory format, like ", ref_name);
}

// A contiguous (C,) tensor of `dtype` on the CPU.
void check_channels(const at::Tensor &t, int64_t C, at::ScalarType dtype, const char *op, const char *name) {
    check_cpu(t, op, name);
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.is_contiguous(), op, ": ", name,
                " must be a contiguous vector of ", C, " (one per channel), got shape ", t.sizes());
}

template <typename T>
T *ptr(const at::Tensor &t) { return static_cast<T *>(t.data_ptr()); }

// The kernels' element type for a float32 or bfloat16 tensor: float or the bf16 bits.
#define PB_FLOATING(t, ...)                                       \
    if ((t).scalar_type() == at::kFloat) {                        \
        using T = float;                                          \
        __VA_ARGS__;                                              \
    } else {                                                      \
        using T = uint16_t;                                       \
        __VA_ARGS__;                                              \
    }

// ------------------------------------------------------------------------------- GELU -> BatchNorm

// y = gelu(z) and its per-channel sum and sum of squares (float64): BatchNorm's batch statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_stats(const at::Tensor &z) {
    check_activation(z, "gelu_stats", "z", true);
    int64_t C = z.size(1), N = z.numel() / C;
    auto y = at::empty_like(z);
    auto s = at::empty({C}, z.options().dtype(at::kDouble)), q = at::empty({C}, z.options().dtype(at::kDouble));
    PB_FLOATING(z, parallel(C / 16, [&](int64_t lo, int64_t hi) {
        PB_DISPATCH(k::gelu_stats(ptr<T>(z), ptr<T>(y), N, C, ptr<double>(s), ptr<double>(q), lo, hi));
    }))
    return {y, s, q};
}

// y * scale[c] + shift[c] (+ residual): BatchNorm's affine pass, a residual sum folded in.
at::Tensor bn_affine(const at::Tensor &y, const at::Tensor &scale, const at::Tensor &shift,
                     const std::optional<at::Tensor> &residual) {
    check_activation(y, "bn_affine", "y", true);
    int64_t C = y.size(1), N = y.numel() / C;
    check_channels(scale, C, at::kFloat, "bn_affine", "scale");
    check_channels(shift, C, at::kFloat, "bn_affine", "shift");
    if (residual) check_like(*residual, y, "bn_affine", "residual", "y");
    auto out = at::empty_like(y);
    PB_FLOATING(y, const T *res = residual ? ptr<T>(*residual) : nullptr;
                parallel(C / 16, [&](int64_t lo, int64_t hi) {
                    PB_DISPATCH(k::affine(ptr<T>(y), res, ptr<T>(out), N, C, ptr<float>(scale), ptr<float>(shift),
                                          lo, hi));
                }))
    return out;
}

// Per-channel sum of grad_out and of grad_out * y (float64).
std::tuple<at::Tensor, at::Tensor> bn_grad_stats(const at::Tensor &y, const at::Tensor &grad_out) {
    check_activation(y, "bn_grad_stats", "y", true);
    check_like(grad_out, y, "bn_grad_stats", "grad_out", "y");
    int64_t C = y.size(1), N = y.numel() / C;
    auto sd = at::empty({C}, y.options().dtype(at::kDouble)), sdy = at::empty({C}, y.options().dtype(at::kDouble));
    PB_FLOATING(y, parallel(C / 16, [&](int64_t lo, int64_t hi) {
        PB_DISPATCH(k::grad_stats(ptr<T>(y), ptr<T>(grad_out), N, C, ptr<double>(sd), ptr<double>(sdy), lo, hi));
    }))
    return {sd, sdy};
}

// dz = (ka[c] * grad_out + kb[c] * y + kc[c]) * gelu'(z): the input gradient of GELU -> BatchNorm.
at::Tensor gelu_bn_grad(const at::Tensor &z, const at::Tensor &y, const at::Tensor &grad_out, const at::Tensor &ka,
                        const at::Tensor &kb, const at::Tensor &kc) {
    check_activation(z, "gelu_bn_grad", "z", true);
    check_like(y, z, "gelu_bn_grad", "y", "z");
    check_like(grad_out, z, "gelu_bn_grad", "grad_out", "z");
    int64_t C = z.size(1), N = z.numel() / C;
    check_channels(ka, C, at::kFloat, "gelu_bn_grad", "ka");
    check_channels(kb, C, at::kFloat, "gelu_bn_grad", "kb");
    check_channels(kc, C, at::kFloat, "gelu_bn_grad", "kc");
    auto dz = at::empty_like(z);
    PB_FLOATING(z, parallel(C / 16, [&](int64_t lo, int64_t hi) {
        PB_DISPATCH(k::gelu_bn_grad(ptr<T>(z), ptr<T>(y), ptr<T>(grad_out), ptr<T>(dz), N, C, ptr<float>(ka),
                                    ptr<float>(kb), ptr<float>(kc), lo, hi));
    }))
    return dz;
}

// --------------------------------------------------------------------- depthwise convolution gradients

// The weight (C, 1, k, k) and bias (C,) gradients, float32, of a stride-1 'same' depthwise convolution
// of x by a k x k kernel (k = 3, 5, 7 or 9) with output gradient grad_out.
std::tuple<at::Tensor, at::Tensor> depthwise_param_grads(const at::Tensor &x, const at::Tensor &grad_out,
                                                         int64_t kernel_size) {
    const char *op = "depthwise_param_grads";
    check_activation(x, op, "x", false);
    check_cpu(grad_out, op, "grad_out");
    TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.sizes() == x.sizes(), op,
                ": grad_out must have x's dtype and shape (", x.scalar_type(), ", ", x.sizes(), "), got ",
                grad_out.scalar_type(), ", ", grad_out.sizes());
    TORCH_CHECK(kernel_size == 3 || kernel_size == 5 || kernel_size == 7 || kernel_size == 9, op,
                ": kernel_size must be 3, 5, 7 or 9, got ", kernel_size);
    int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    auto xs = x.permute({0, 2, 3, 1}).contiguous(), gs = grad_out.permute({0, 2, 3, 1}).contiguous();  // (B, H, W, C)
    auto dw = at::empty({kernel_size * kernel_size, C}, x.options().dtype(at::kFloat));
    auto db = at::empty({C}, x.options().dtype(at::kFloat));
    PB_FLOATING(x, parallel(C / 16, [&](int64_t lo, int64_t hi) {
        const T *xp = ptr<T>(xs), *gp = ptr<T>(gs);
        float *w = ptr<float>(dw), *b = ptr<float>(db);
        switch (kernel_size) {
            case 3: PB_DISPATCH(k::dw_wgrad<3>(xp, gp, w, b, B, H, W, C, lo, hi)); break;
            case 5: PB_DISPATCH(k::dw_wgrad<5>(xp, gp, w, b, B, H, W, C, lo, hi)); break;
            case 7: PB_DISPATCH(k::dw_wgrad<7>(xp, gp, w, b, B, H, W, C, lo, hi)); break;
            default: PB_DISPATCH(k::dw_wgrad<9>(xp, gp, w, b, B, H, W, C, lo, hi));
        }
    }))
    return {dw.t().contiguous().view({C, 1, kernel_size, kernel_size}), db};
}

}  // namespace

TORCH_LIBRARY(patchbench, m) {
    m.def("gelu_stats(Tensor z) -> (Tensor, Tensor, Tensor)");
    m.def("bn_affine(Tensor y, Tensor scale, Tensor shift, Tensor? residual=None) -> Tensor");
    m.def("bn_grad_stats(Tensor y, Tensor grad_out) -> (Tensor, Tensor)");
    m.def("gelu_bn_grad(Tensor z, Tensor y, Tensor grad_out, Tensor ka, Tensor kb, Tensor kc) -> Tensor");
    m.def("depthwise_param_grads(Tensor x, Tensor grad_out, int kernel_size) -> (Tensor, Tensor)");
    m.def("cpu_isa(str cap=\"\") -> str", &cpu_isa);
    m.def("threads_used() -> int", &threads_used);
}

// CompositeExplicitAutograd: the checks above run (and name a tensor on the wrong device) whatever
// device the inputs are on; the Python side registers the shapes for FakeTensor and meta tensors.
TORCH_LIBRARY_IMPL(patchbench, CompositeExplicitAutograd, m) {
    m.impl("gelu_stats", &gelu_stats);
    m.impl("bn_affine", &bn_affine);
    m.impl("bn_grad_stats", &bn_grad_stats);
    m.impl("gelu_bn_grad", &gelu_bn_grad);
    m.impl("depthwise_param_grads", &depthwise_param_grads);
}
