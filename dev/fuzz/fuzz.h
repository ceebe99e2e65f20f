// fuzz.h: what every libFuzzer harness in dev/fuzz shares.
// A harness hands the fuzzer's bytes to one of the project's parsers. The parser may refuse
// them by throwing Error (that is its job); anything else -- a crash, a sanitizer report, a
// different exception, a timeout, an allocation over -malloc_limit_mb -- is a finding.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>
#include "../../common/util.h"

// Runs fn, treating Error as a clean refusal. Other exceptions escape and abort the run,
// which libFuzzer reports as a crash with the input that caused it.
template <typename F>
inline void refuse_ok(F fn) {
    try {
        fn();
    } catch (const Error&) {
    }
}

// A check that must hold for every input the parser accepted (e.g. a written file reads
// back); failing it aborts so libFuzzer saves the input.
#define FUZZ_ASSERT(cond)                                                                  \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "FUZZ_ASSERT failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            abort();                                                                       \
        }                                                                                  \
    } while (0)
