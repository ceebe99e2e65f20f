// schedule.h: learning-rate schedules, as pure functions of the step (so resuming needs
// nothing but the step number).
//   cosine:   linear warmup to lr, then cosine from lr down to lr_min at the last step
//   wsd:      warmup, stable at lr, then linear decay to lr_min over the last decay_frac
//   constant: warmup, then lr
//
// defines: LRSchedule
#pragma once
#include <cmath>
#include <string>
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

struct LRSchedule {
    std::string kind = "cosine";
    double lr = 3e-4, lr_min = 0;
    int warmup = 0, total = 1;
    double decay_frac = 0.2;  // wsd only

    void validate() const {
        if (kind != "cosine" && kind != "wsd" && kind != "constant")
            FAIL("--lr-schedule must be cosine, wsd or constant, found \"%s\"", kind.c_str());
        if (lr < 0 || lr_min < 0) FAIL("learning rates must be >= 0");
        if (decay_frac < 0 || decay_frac > 1) FAIL("--wsd-decay must be in [0, 1]");
    }
    // lr for optimizer step `step` (0-based)
    double at(int step) const {
        if (warmup > 0 && step < warmup) return lr * (step + 1) / warmup;
        if (kind == "constant") return lr;
        if (kind == "wsd") {
            int decay_steps = (int)std::lround(decay_frac * total);
            int decay_start = total - decay_steps;
            if (step < decay_start || decay_steps <= 0) return lr;
            double frac = (double)(step - decay_start + 1) / decay_steps;
            return lr + (lr_min - lr) * std::min(1.0, frac);
        }
        int span = total - warmup;
        if (span <= 1) return lr;
        double frac = std::min(1.0, (double)(step - warmup) / (span - 1));
        return lr_min + 0.5 * (lr - lr_min) * (1.0 + std::cos(M_PI * frac));
    }
};
