// Hopper warpgroup MMA (wgmma, sm_90a) for the NF4 kernels: one m64nNk16 MMA of a warpgroup, A (16-bit weights, 64
// rows) from registers, B (N tokens x 16, K-major, 128-byte swizzle) from shared memory by descriptor, fp32
// accumulators in registers, D += A x B. Inline PTX names every accumulator register, so each N is written out (a
// macro a shape, for both 16-bit types). Only compiled for sm_90a (nvcc defines __CUDA_ARCH_FEAT_SM90_ALL there);
// elsewhere the kernels that use it are empty and never launched (cuda_nf4_wgmma.wgmma_supported).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LORAPLEX_WGMMA 1
#endif

namespace {

template <typename T, int N>
struct Wgmma;

#ifdef LORAPLEX_WGMMA
#define LORAPLEX_WGMMA_N16(CTYPE, PTX_TYPE)                                                              \
  template <> struct Wgmma<CTYPE, 16> {                                                                  \
    static __device__ __forceinline__ void mma(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b) { \
      asm volatile(                                                                                      \
          "{\n.reg .pred p;\n"                                                                           \
          "setp.ne.b32 p, %13, 0;\n"                                                                     \
          "wgmma.mma_async.sync.aligned.m64n16k16.f32." PTX_TYPE "." PTX_TYPE " {"                       \
          "%0, %1, %2, %3, %4, %5, %6, %7"                                                               \
          "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n"                                                    \
          "}\n"                                                                                          \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),          \
            "+f"(d[7])                                                                                   \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                            \
    }                                                                                                    \
  };

LORAPLEX_WGMMA_N16(__nv_bfloat16, "bf16")
LORAPLEX_WGMMA_N16(__half, "f16")
#undef LORAPLEX_WGMMA_N16

#define LORAPLEX_WGMMA_N32(CTYPE, PTX_TYPE)                                                               \
  template <> struct Wgmma<CTYPE, 32> {                                                                   \
    static __device__ __forceinline__ void mma(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b) { \
      asm volatile(                                                                                       \
          "{\n.reg .pred p;\n"                                                                            \
          "setp.ne.b32 p, %21, 0;\n"                                                                      \
          "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTX_TYPE "." PTX_TYPE " {"                        \
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"                          \
          "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n"                                                   \
          "}\n"                                                                                           \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),           \
            "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),       \
            "+f"(d[14]), "+f"(d[15])                                                                      \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                             \
    }                                                                                                     \
  };

LORAPLEX_WGMMA_N32(__nv_bfloat16, "bf16")
LORAPLEX_WGMMA_N32(__half, "f16")
#undef LORAPLEX_WGMMA_N32

#define LORAPLEX_WGMMA_N64(CTYPE, PTX_TYPE)                                                               \
  template <> struct Wgmma<CTYPE, 64> {                                                                   \
    static __device__ __forceinline__ void mma(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) { \
      asm volatile(                                                                                       \
          "{\n.reg .pred p;\n"                                                                            \
          "setp.ne.b32 p, %37, 0;\n"                                                                      \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " {"                        \
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                        \
          "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                \
          "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"                                                   \
          "}\n"                                                                                           \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),           \
            "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),       \
            "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),    \
            "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),    \
            "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                            \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                             \
    }                                                                                                     \
  };

LORAPLEX_WGMMA_N64(__nv_bfloat16, "bf16")
LORAPLEX_WGMMA_N64(__half, "f16")
#undef LORAPLEX_WGMMA_N64

#define LORAPLEX_WGMMA_N128(CTYPE, PTX_TYPE)                                                              \
  template <> struct Wgmma<CTYPE, 128> {                                                                  \
    static __device__ __forceinline__ void mma(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) { \
      asm volatile(                                                                                       \
          "{\n.reg .pred p;\n"                                                                            \
          "setp.ne.b32 p, %69, 0;\n"                                                                      \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " {"                       \
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                        \
          "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "              \
          "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "              \
          "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                \
          "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"                                                   \
          "}\n"                                                                                           \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),           \
            "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),       \
            "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),    \
            "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),    \
            "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),    \
            "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),    \
            "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),    \
            "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),    \
            "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),    \
            "+f"(d[63])                                                                                   \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                             \
    }                                                                                                     \
  };

LORAPLEX_WGMMA_N128(__nv_bfloat16, "bf16")
LORAPLEX_WGMMA_N128(__half, "f16")
#undef LORAPLEX_WGMMA_N128

#define LORAPLEX_WGMMA_N256(CTYPE, PTX_TYPE)                                                                  \
  template <> struct Wgmma<CTYPE, 256> {                                                                      \
    static __device__ __forceinline__ void mma(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {    \
      asm volatile(                                                                                           \
          "{\n.reg .pred p;\n"                                                                                \
          "setp.ne.b32 p, %133, 0;\n"                                                                         \
          "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX_TYPE "." PTX_TYPE " {"                           \
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                            \
          "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                  \
          "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                  \
          "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                  \
          "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                  \
          "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                  \
          "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "      \
          "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"    \
          "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"                                                  \
          "}\n"                                                                                               \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),               \
            "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),           \
            "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),        \
            "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),        \
            "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),        \
            "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),        \
            "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),        \
            "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),        \
            "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),        \
            "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),        \
            "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),        \
            "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),        \
            "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),        \
            "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),        \
            "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]),   \
            "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
            "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), \
            "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), \
            "+f"(d[126]), "+f"(d[127])                                                                        \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                                 \
    }                                                                                                         \
  };

LORAPLEX_WGMMA_N256(__nv_bfloat16, "bf16")
LORAPLEX_WGMMA_N256(__half, "f16")
#undef LORAPLEX_WGMMA_N256

#endif  // LORAPLEX_WGMMA

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: rows of 64 16-bit values (128 bytes),
// 8-row groups 1,024 bytes apart (the tile 1,024-byte aligned); `addr` is the shared-memory byte address of the
// k-step's first 16-byte chunk in row 0 (the tile's base + 32 bytes a k-step).
__host__ __device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4)  // start address, bits 0-13
         | (static_cast<uint64_t>(1) << 16)            // leading byte offset (unused with this swizzle), bits 16-29
         | (static_cast<uint64_t>(1024 >> 4) << 32)    // stride byte offset: 8 rows of 128 bytes, bits 32-45
         | (static_cast<uint64_t>(1) << 62);           // layout: 128-byte swizzle, bits 62-63
}

// smem_desc_sw128(addr) from its low word (the start address and the leading byte offset) and the high word every
// tile of this layout shares: the low word alone varies, so a kernel that walks tiles in a loop ptxas cannot prove
// uniform moves one register into the uniform file a wgmma, where a 64-bit descriptor took an add with carry and two
// moves (nf4_wgmma_resident_kernel).
constexpr uint32_t kSmemDescSw128Hi = (1024 >> 4) | (1u << 30);
__host__ __device__ __forceinline__ uint32_t smem_desc_sw128_lo(uint32_t addr) {
  return static_cast<uint32_t>(smem_desc_sw128(addr));
}
__host__ __device__ __forceinline__ uint64_t smem_desc_from_lo(uint32_t lo) {
  return (static_cast<uint64_t>(kSmemDescSw128Hi) << 32) | lo;
}

// smem_desc_sw128(addr + bytes) from smem_desc_sw128(addr): one 64-bit add of bytes / 16 into the start address
// field, where building a descriptor anew took six instructions (ptxas, sm_90a: add, mask, shift, or, two moves) a
// wgmma. Exact while addr and addr + bytes are multiples of 16 below 2^18 (the field then cannot carry into bit 14;
// an SM's shared memory is 228 KB): test_nvcc_library checks it over the whole window.
__host__ __device__ __forceinline__ uint64_t smem_desc_advance(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef LORAPLEX_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef LORAPLEX_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#ifdef LORAPLEX_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Generic-proxy stores to shared memory made visible to the async proxy (the wgmma's operand reads).
__device__ __forceinline__ void fence_proxy_async_smem() {
#ifdef LORAPLEX_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace
