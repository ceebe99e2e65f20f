// llmc_bench.c: times llm.c's CPU trainer (train_gpt2.c) on random weights, for
// dev/bench/bench_cpu.sh. llm.c is not part of this repository: the script compiles this file
// with -DLLMC_TRAIN_GPT2='"<path>/train_gpt2.c"', which includes it whole (its main renamed),
// and with llm.c's own flags (-Ofast -march=native -fopenmp). This program writes a
// checkpoint of random weights in llm.c's format (a 256-int header: magic 20240326, version
// 3, max T, V, L, heads, channels, padded V; then the fp32 parameters), loads it with
// gpt2_build_from_checkpoint, and times the same step train_gpt2.c's main loop runs:
// gpt2_forward, gpt2_zero_grad, gpt2_backward, gpt2_update. Random tokens; GPT-2 124M shape.
#define main llmc_train_gpt2_main
#include LLMC_TRAIN_GPT2
#undef main
#include <omp.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char** argv) {
    int B = 4, T = 64, steps = 3, threads = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--batch")) B = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seq")) T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
    }
    omp_set_num_threads(threads);
    GPT2Config cfg = {.max_seq_len = 1024, .vocab_size = 50257, .padded_vocab_size = 50304, .num_layers = 12,
                      .num_heads = 12, .channels = 768};
    size_t sizes[NUM_PARAMETER_TENSORS], n = 0;
    fill_in_parameter_sizes(sizes, cfg);
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) n += sizes[i];
    int header[256] = {20240326, 3, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.channels,
                       cfg.padded_vocab_size};
    float* p = (float*)malloc(n * sizeof(float));
    uint64_t s = 1337;
    for (size_t i = 0; i < n; i++) p[i] = 0.04f * (random_f32(&s) - 0.5f);  // small uniform weights
    const char* path = "/tmp/llmc_bench_random_124M.bin";
    FILE* f = fopen(path, "wb");
    fwrite(header, sizeof(int), 256, f);
    fwrite(p, sizeof(float), n, f);
    fclose(f);
    free(p);
    GPT2 model;
    gpt2_build_from_checkpoint(&model, path);
    int* tokens = (int*)malloc((size_t)(B * T + 1) * sizeof(int));
    for (int i = 0; i <= B * T; i++) tokens[i] = (int)(random_u32(&s) % cfg.vocab_size);
    double best = 1e9;
    for (int step = 0; step <= steps; step++) {  // step 0: warm-up (allocations)
        double t0 = now_s();
        gpt2_forward(&model, tokens, tokens + 1, B, T);
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        gpt2_update(&model, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.0f, step + 1);
        double dt = now_s() - t0;
        if (step > 0 && dt < best) best = dt;
    }
    // matmul parameters: 12 d^2 per layer + the (tied) LM head over the padded vocab
    double C = cfg.channels, L = cfg.num_layers;
    double matmul_params = L * 12 * C * C + (double)cfg.padded_vocab_size * C;
    double flops_tok = 6 * matmul_params + 6 * L * T * C;
    printf("bench: %-14s %-5s d%d L%d V%d B%d T%d threads %d | %.3f s/step | %.0f tok/s | %.1f GFLOP/s "
           "(%.1fM matmul params)\n", "llm.c", "gpt2", cfg.channels, cfg.num_layers, cfg.padded_vocab_size, B, T,
           threads, best, B * T / best, flops_tok * B * T / best / 1e9, matmul_params / 1e6);
    gpt2_free(&model);
    remove(path);
    return 0;
}
