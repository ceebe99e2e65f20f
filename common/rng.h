// rng.h: a counter-based random number generator (Philox4x32-10, Salmon et al. 2011).
//
// Each random number is a pure function of (seed, stream, index): no hidden state to
// carry between threads, so results never depend on the thread count or on the order in
// which tensors are visited, and the same values can be produced on the GPU. Streams name
// what the numbers are for, e.g. stream_id(PURPOSE_DROP_VALUES, layer, expert, matrix).
//
// defines: Philox4, philox4x32, RngPurpose, stream_id, rng_uniform, rng_u64, rng_normal, RngStream
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define RNG_HD __host__ __device__
#else
#define RNG_HD
#endif

struct Philox4 {
    uint32_t v[4];
};

RNG_HD inline Philox4 philox4x32(uint64_t key, uint64_t ctr_lo, uint64_t ctr_hi) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    uint32_t c0 = (uint32_t)ctr_lo, c1 = (uint32_t)(ctr_lo >> 32), c2 = (uint32_t)ctr_hi, c3 = (uint32_t)(ctr_hi >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    Philox4 out = {{c0, c1, c2, c3}};
    return out;
}

// What a stream of random numbers is used for. Never renumber: saved outputs depend on it.
enum RngPurpose : uint32_t {
    PURPOSE_INIT = 1,          // from-scratch weights (docs/METHODS.md 2.1)
    PURPOSE_ROUTER = 2,        // router rows of upcycled models (docs/METHODS.md 2.2)
    PURPOSE_DROP_INDEX = 3,    // Drop-Upcycling neuron sets
    PURPOSE_DROP_VALUES = 4,   // Drop-Upcycling new values
    PURPOSE_NOISE_INDEX = 5,   // random-noise upcycling neuron sets
    PURPOSE_NOISE_VALUES = 6,  // random-noise upcycling noise
    PURPOSE_DATA = 7,          // data order
    PURPOSE_SAMPLE = 8,        // text sampling
    PURPOSE_MISC = 9,
};

// Stream id from a purpose and up to three small coordinates (layer, expert, matrix).
RNG_HD inline uint64_t stream_id(RngPurpose purpose, uint32_t a = 0, uint32_t b = 0, uint32_t c = 0) {
    return ((uint64_t)purpose << 56) ^ ((uint64_t)(a & 0xffffu) << 40) ^ ((uint64_t)(b & 0xffffu) << 24) ^
           (uint64_t)(c & 0xffffffu);
}

// Uniform in [0, 1) with 24 random bits: exact in float.
RNG_HD inline float u32_to_unit_float(uint32_t x) { return (x >> 8) * (1.0f / 16777216.0f); }
// Uniform in (0, 1) with 53 bits, never 0 (safe for log).
RNG_HD inline double u64_to_open_unit(uint32_t hi, uint32_t lo) {
    uint64_t x = ((uint64_t)hi << 21) ^ (uint64_t)lo;
    return ((double)(x & ((1ull << 53) - 1)) + 0.5) * (1.0 / 9007199254740992.0);
}

// Element `index` of a uniform [0,1) stream.
RNG_HD inline float rng_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
    return u32_to_unit_float(philox4x32(seed, index, stream).v[0]);
}
// 64 random bits, element `index` of a stream.
RNG_HD inline uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t index) {
    Philox4 r = philox4x32(seed, index, stream);
    return ((uint64_t)r.v[0] << 32) | r.v[1];
}
// Element `index` of a standard normal stream (Box-Muller on 53-bit uniforms, in double).
RNG_HD inline double rng_normal(uint64_t seed, uint64_t stream, uint64_t index) {
    Philox4 r = philox4x32(seed, index >> 1, stream);
    double u1 = u64_to_open_unit(r.v[0], r.v[1]), u2 = u64_to_open_unit(r.v[2], r.v[3]);
    double rad = sqrt(-2.0 * log(u1)), th = 6.283185307179586 * u2;
    return (index & 1) ? rad * sin(th) : rad * cos(th);
}

// A sequential view of one stream, for code that draws one number after another
// (data order, sampling). Its whole state is `counter`, saved in trainer_state.json.
struct RngStream {
    uint64_t seed, stream, counter = 0;
    RngStream(uint64_t s = 0, uint64_t st = 0) : seed(s), stream(st) {}
    uint64_t next_u64() { return rng_u64(seed, stream, counter++); }
    float uniform() { return rng_uniform(seed, stream, counter++); }
    double normal() { return rng_normal(seed, stream, counter++); }
    // uniform integer in [0, n), without modulo bias worth mentioning (n << 2^64)
    uint64_t below(uint64_t n) { return next_u64() % n; }
};
