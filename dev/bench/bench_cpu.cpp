// bench_cpu.cpp: CPU trainer throughput (make bench-cpu runs it through dev/bench/bench_cpu.sh).
// Times whole training steps (forward, backward, AdamW) of the trainer's own Model on random
// weights and random tokens, and prints tokens/s and effective GFLOP/s:
//   FLOPs per token = 6 x (matmul parameters a token touches: attention, router, K experts
//                     or the dense FFN, LM head) + 6 L T d (causal attention, as docs/perf.md)
// next to the machine's measured single-core peak (an FMA loop) times the thread count.
// --profile: also the time of each layer op at this shape (one call each, min of repeats).
// Build: g++ -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math -fno-plt dev/bench/bench_cpu.cpp (the Makefile's CXXFLAGS)
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include <chrono>
#include <random>

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Peak of one core: 12 independent chains of 16-wide multiply-adds (enough to cover the FMA
// latency on both FMA pipes), 2 FLOPs each, in GFLOP/s. The chains use gcc's vector type so
// that they stay in registers (a plain array was kept in memory, and measured store-to-load
// latency instead of the FMA units); gcc emits one vfmadd per chain and iteration.
typedef float v16f __attribute__((vector_size(64)));
static double measure_peak_gflops() {
    const int chains = 12;
    v16f acc[chains];
    for (int i = 0; i < chains; i++)
        for (int j = 0; j < 16; j++) acc[i][j] = (float)(i + j) * 1e-3f;
    const v16f m = v16f{} + 0.999999f, a = v16f{} + 1e-7f;
    const long iters = 20000000;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
            for (int i = 0; i < chains; i++) acc[i] = acc[i] * m + a;
        double dt = now_s() - t0;
        best = std::max(best, 2.0 * chains * 16 * iters / dt / 1e9);
    }
    float sink = 0;
    for (int i = 0; i < chains; i++) sink += acc[i][0];
    printf("(peak loop checksum %g)\n", sink);
    return best;
}

int main(int argc, char** argv) {
    std::string preset = "d768", name = "";
    int experts = 0, topk = 2, width = 0, vocab = 50304, B = 4, T = 64, steps = 3, threads = 1;
    bool profile = false, peak = false;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&] { if (i + 1 >= argc) { fprintf(stderr, "%s needs a value\n", a.c_str()); exit(1); } return std::string(argv[++i]); };
        if (a == "--model") preset = next();
        else if (a == "--experts") experts = std::stoi(next());
        else if (a == "--topk") topk = std::stoi(next());
        else if (a == "--expert-width") width = std::stoi(next());
        else if (a == "--vocab") vocab = std::stoi(next());
        else if (a == "--batch") B = std::stoi(next());
        else if (a == "--seq") T = std::stoi(next());
        else if (a == "--steps") steps = std::stoi(next());
        else if (a == "--threads") threads = std::stoi(next());
        else if (a == "--name") name = next();
        else if (a == "--profile") profile = true;
        else if (a == "--peak") peak = true;
        else { fprintf(stderr, "unknown option %s\n", a.c_str()); return 1; }
    }
    omp_set_num_threads(threads);
    if (peak) { printf("peak: %.1f GFLOP/s per core (FMA loop, fp32)\n", measure_peak_gflops()); return 0; }
    ModelConfig c;
    if (!model_preset(preset, &c)) { fprintf(stderr, "unknown preset %s\n", preset.c_str()); return 1; }
    c.vocab_size = vocab;
    c.n_experts = experts;
    c.top_k = experts ? topk : 0;
    if (experts && width) c.ffn_dim = width;
    Model M;
    M.init_scratch(c, 1337);
    const int N = B * T, d = c.d_model, L = c.n_layer;
    std::mt19937 g(1);
    std::vector<int> in(N), tg(N);
    for (int i = 0; i < N; i++) { in[i] = (int)(g() % vocab); tg[i] = (int)(g() % vocab); }
    // FLOPs per token (see the header)
    double per_layer = (double)d * c.q_dim() * 2 + (double)d * c.kv_dim() * 2 +
                       (experts ? (double)topk * 3 * d * c.ffn_dim + (double)d * experts : 3.0 * d * c.ffn_dim);
    double matmul_params = L * per_layer + (double)vocab * d;
    double flops_tok = 6 * matmul_params + 6.0 * L * T * c.q_dim();
    AdamWSettings hp;
    std::vector<double> times;
    for (int s = 0; s <= steps; s++) {  // step 0 is a warm-up (allocations, page faults)
        double t0 = now_s();
        M.zero_grad();
        M.forward(in.data(), tg.data(), B, T);
        M.backward();
        M.step(hp, 1e-4);
        if (s > 0) times.push_back(now_s() - t0);
    }
    std::sort(times.begin(), times.end());
    double t = times[0];  // min: the machine is shared, the min is the least disturbed step
    printf("bench: %-14s %-5s d%d L%d E%d K%d F%d V%d B%d T%d threads %d | %.4f s/step (median %.4f) | %.0f tok/s | "
           "%.1f GFLOP/s (%.1fM matmul params)\n",
           name.empty() ? (experts ? "moe" : "dense") : name.c_str(), preset.c_str(), d, L, experts, c.top_k,
           c.ffn_dim, vocab, B, T, threads, t, times[times.size() / 2], N / t, flops_tok * N / t / 1e9,
           matmul_params / 1e6);
    if (profile) {  // each op of one layer at this shape, forward then backward (min of 3)
        const int F = c.ffn_dim, qd = c.q_dim(), H = c.n_head, hd = c.head_dim;
        std::vector<real> x((size_t)N * std::max(F, qd) * 2 + (size_t)N * vocab), y(x.size()), z(x.size());
        for (auto& v : x) v = (real)((g() % 1000) * 1e-3 - 0.5);
        std::vector<real> w((size_t)std::max((size_t)F, (size_t)vocab) * d), dw(w.size()), att((size_t)B * H * T * T);
        auto time_op = [&](const char* op, double flops, auto f) {
            double best = 1e9;
            for (int r = 0; r < 3; r++) { double t0 = now_s(); f(); best = std::min(best, now_s() - t0); }
            printf("  %-34s %8.2f ms  %6.1f GFLOP/s\n", op, best * 1e3, flops > 0 ? flops / best / 1e9 : 0.0);
            return best;
        };
        printf("profile (one layer's ops; x%d layers in a step):\n", L);
        time_op("rmsnorm fwd", 0, [&] { rmsnorm_forward(y.data(), z.data(), x.data(), w.data(), N, d, 1e-5f); });
        time_op("matmul fwd q (d -> qd)", 2.0 * N * d * qd, [&] { matmul_forward(y.data(), x.data(), w.data(), N, d, qd); });
        time_op("attention fwd", 4.0 * B * H * T * T / 2 * hd,
                [&] { attention_forward(y.data(), att.data(), x.data(), x.data(), x.data(), B, T, H, H, hd); });
        time_op("matmul fwd FFN up (d -> F)", 2.0 * N * d * F, [&] { matmul_forward(y.data(), x.data(), w.data(), N, d, F); });
        std::vector<real> sig((size_t)N * F), du((size_t)N * F);
        time_op("swiglu fwd", 0, [&] { swiglu_forward(y.data(), sig.data(), x.data(), z.data(), (size_t)N * F); });
        time_op("matmul fwd FFN down (F -> d)", 2.0 * N * d * F, [&] { matmul_forward(y.data(), x.data(), w.data(), N, F, d); });
        time_op("matmul bwd q (dinp + dw)", 4.0 * N * d * qd,
                [&] { matmul_backward(y.data(), dw.data(), x.data(), z.data(), w.data(), N, d, qd); });
        time_op("swiglu bwd", 0, [&] { swiglu_backward(y.data(), du.data(), x.data(), z.data(), x.data(), sig.data(), (size_t)N * F); });
        time_op("attention bwd", 8.0 * B * H * T * T / 2 * hd, [&] {
            attention_backward(y.data(), z.data(), dw.data(), x.data(), att.data(), x.data(), x.data(), x.data(), B, T,
                               H, H, hd);
        });
        time_op("matmul bwd FFN up (dinp + dw)", 4.0 * N * d * F,
                [&] { matmul_backward(y.data(), dw.data(), x.data(), z.data(), w.data(), N, d, F); });
        time_op("matmul bwd FFN down (dinp + dw)", 4.0 * N * d * F,
                [&] { matmul_backward(y.data(), dw.data(), x.data(), z.data(), w.data(), N, F, d); });
        printf("profile (once per step):\n");
        time_op("matmul fwd lm_head (d -> V)", 2.0 * N * d * vocab,
                [&] { matmul_forward(y.data(), x.data(), w.data(), N, d, vocab); });
        time_op("crossentropy fwd", 0, [&] { crossentropy_forward(z.data(), y.data(), tg.data(), N, vocab); });
        time_op("crossentropy bwd", 0,
                [&] { crossentropy_backward(x.data(), y.data(), z.data(), tg.data(), N, vocab, (real)1 / N); });
        time_op("matmul bwd lm_head (dinp + dw)", 4.0 * N * d * vocab,
                [&] { matmul_backward(y.data(), dw.data(), x.data(), z.data(), w.data(), N, d, vocab); });
        time_op("AdamW (all parameters)", 0, [&] {
            AdamWStep st = adamw_step(hp, 1.0, 1);
            adamw_update(M.params.data(), M.grads.data(), M.m.data(), M.v.data(), (long)M.params.size(), hp, st, 1e-4, 0.1);
        });
    }
    return 0;
}
