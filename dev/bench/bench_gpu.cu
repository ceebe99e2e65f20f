/*
dev/bench/bench_gpu.cu: the GPU trainer's throughput on one configuration (dev/bench/bench.sh
runs the table). It is train_moe.cu's own GPUModel and training step, timed: WARMUP untimed
steps (cuBLAS heuristics, shared-memory attributes, caches), then --steps timed steps between
two device synchronizations. Prints one line:
  bench: <dense|MoE> | N steps of T tokens | ms/step | tok/s | MFU | GPU memory in use | last loss
MFU counts 6 N_active + causal attention FLOPs per token over the device's dense bf16 peak
(docs/perf.md); "n/a" on a device the peak table does not know.
Data: the shards of --data when it has them, else uniform random tokens (--vocab sets the size).
--measured-peak X (TFLOP/s) adds the MFU over X, the GEMM peak this GPU reached.
--gemm-peak N measures that peak instead: one bf16 GEMM N x N x N with fp32 accumulation
(cublasGemmEx, as the trainer's matmuls), 3 untimed and 10 timed, and prints
  gemm: bf16 N^3 | ms | TFLOP/s
Writes no files.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cu"

// The dense bf16 GEMM rate this GPU reaches through cuBLAS: the ceiling a training step's
// matmuls can approach (H200: ~790 TFLOP/s measured elsewhere against the 989 spec)
int gemm_peak(int n) {
    cublasHandle_t h;
    cublasCheck(cublasCreate(&h));
    const size_t nn = (size_t)n * n;
    bf16 *a, *b, *c;
    cudaCheck(cudaMalloc(&a, nn * sizeof(bf16)));
    cudaCheck(cudaMalloc(&b, nn * sizeof(bf16)));
    cudaCheck(cudaMalloc(&c, nn * sizeof(bf16)));
    cudaCheck(cudaMemset(a, 0, nn * sizeof(bf16)));  // zeros: the rate does not depend on the values
    cudaCheck(cudaMemset(b, 0, nn * sizeof(bf16)));
    auto run = [&]() { gpu::gemm_ex(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, 0.0f, c, CUDA_R_16BF, n); };
    for (int i = 0; i < 3; i++) run();
    cudaCheck(cudaDeviceSynchronize());
    const int reps = 10;
    const double t0 = now_seconds();
    for (int i = 0; i < reps; i++) run();
    cudaCheck(cudaDeviceSynchronize());
    const double dt = (now_seconds() - t0) / reps;
    printf("gemm: bf16 %d^3 | %.3f ms | %.1f TFLOP/s\n", n, dt * 1e3, 2.0 * n * (double)n * n / dt / 1e12);
    cudaFree(a); cudaFree(b); cudaFree(c);
    cublasDestroy(h);
    return 0;
}

template <typename T>
int bench(TrainArgs& args, int warmup_steps, bool stochastic_round, bool cuda_graphs, double measured_peak) {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    const double peak = device_peak_flops(prop);
    Tokenizer tok;
    load_run_tokenizer(args, &tok);
    ModelConfig cfg = config_from_args(args, tok.ok() ? (int)tok.tokens.size() : 0);
    ParamLayout lay = build_layout(cfg);
    std::vector<float> host(lay.total, 0.0f);
    init_from_scratch(cfg, lay, host.data(), (uint64_t)args.seed, (float)args.init_std);

    std::unique_ptr<DataLoader> data;
    try {
        data.reset(new DataLoader(args.data_dir, args.mix, args.batch, args.seq, cfg.vocab_size, (uint64_t)args.seed));
    } catch (const Error& e) {
        printf("bench: no usable data in %s (%s): uniform random tokens\n", args.data_dir.c_str(), e.what());
    }
    GPUModel<T> M;
    M.router_loss = router_loss_from_args(args);
    M.seed = (uint64_t)args.seed;
    M.stochastic_round = stochastic_round;
    M.cuda_graphs = cuda_graphs;
    M.setup(cfg, host, {});
    M.alloc(args.batch, args.seq);
    printf("device: %s (%s)\n", prop.name, sizeof(T) == 4 ? "fp32" : "bf16 mixed precision");
    print_model_summary(cfg, M.router_loss);
    printf("%s\n", M.summary_note().c_str());

    LRSchedule sched = schedule_from_args(args);
    AdamWSettings hp = adamw_from_args(args);
    std::vector<int> inp((size_t)args.batch * args.seq), tgt(inp.size());
    uint64_t counter = 0;
    auto next_batch = [&]() {
        if (data) { data->next_batch(inp.data(), tgt.data()); return; }
        for (size_t i = 0; i < inp.size(); i++) {
            inp[i] = (int)(rng_u64((uint64_t)args.seed, stream_id(PURPOSE_MISC, 0xbe), counter++) % cfg.vocab_size);
            tgt[i] = (int)(rng_u64((uint64_t)args.seed, stream_id(PURPOSE_MISC, 0xbe), counter++) % cfg.vocab_size);
        }
    };
    auto train_step = [&](double lr) {  // the training loop's step (common/run.h run_training): no host wait
        M.zero_grad();                      // until step()'s end, which then has the step's losses
        for (int micro = 0; micro < args.grad_accum; micro++) {
            next_batch();
            M.forward_backward(inp.data(), tgt.data(), args.batch, args.seq, args.grad_accum);
        }
        M.step(hp, lr);
        return M.step_losses;
    };
    for (int i = 0; i < warmup_steps; i++) train_step(sched.at(0));
    cudaCheck(cudaDeviceSynchronize());
    double t0 = now_seconds();
    Losses last;
    for (int s = 0; s < args.steps; s++) last = train_step(sched.at(s));
    cudaCheck(cudaDeviceSynchronize());
    const double dt = (now_seconds() - t0) / std::max(1, args.steps);
    const double tokens_per_step = (double)args.batch * args.seq * args.grad_accum;
    const double flops_step = flops_per_token(cfg, args.seq) * tokens_per_step;
    size_t free_b = 0, total_b = 0;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    printf("bench: %s%s | %d steps of %.0f tokens | %.1f ms/step | %.0f tok/s | MFU %s | MFU of GEMM peak %s | "
           "GPU memory in use %.2f GiB | last loss %.4f\n",
           cfg.is_moe() ? "MoE" : "dense", M.graphs_used() ? "" : " (no CUDA graphs)", args.steps, tokens_per_step, dt * 1e3, tokens_per_step / dt,
           peak > 0 ? strfmt("%.1f%%", 100 * flops_step / dt / peak).c_str() : "n/a (unknown device)",
           measured_peak > 0 ? strfmt("%.1f%%", 100 * flops_step / dt / (measured_peak * 1e12)).c_str() : "n/a",
           (total_b - free_b) / 1073741824.0, last.loss);
    return std::isfinite(last.loss) ? 0 : 1;
}

int main(int argc, char** argv) {
    TrainArgs args;
    std::string dtype = "bf16", graphs = "on";
    int warmup_steps = 3;
    bool no_sr = false;
    int gemm_n = 0;
    double measured_peak = 0;
    Cli cli("bench_gpu", "Throughput of the GPU trainer on one configuration (no files written).\n"
                         "Example: ./build/bench_gpu --model d768 --batch 8 --seq 1024 --steps 10 --experts 8 --topk 2");
    args.add_to(cli);
    cli.section("Benchmark");
    cli.add("--dtype", &dtype, "bf16 or fp32");
    cli.add("--warmup-steps", &warmup_steps, "untimed steps before the timed --steps");
    cli.flag("--no-stochastic-rounding", &no_sr, "bf16: round the weight copy to nearest");
    cli.add("--cuda-graphs", &graphs, "on or off (train_moe_gpu --cuda-graphs)");
    cli.add("--measured-peak", &measured_peak, "TFLOP/s: also report the MFU over this (the --gemm-peak result)",
            Range::at_least(0));
    cli.add("--gemm-peak", &gemm_n, "measure the bf16 cuBLAS GEMM rate at N x N x N instead (e.g. 8192)",
            Range::between(0, 65536));
    try {
        cli.parse(argc, argv);
        args.validate();
        if (dtype != "bf16" && dtype != "fp32") FAIL("--dtype must be bf16 or fp32, found \"%s\"", dtype.c_str());
        if (graphs != "on" && graphs != "off") FAIL("--cuda-graphs must be on or off, found \"%s\"", graphs.c_str());
        if (warmup_steps < 0) FAIL("--warmup-steps must be >= 0, found %d", warmup_steps);
        if (gemm_n > 0) return gemm_peak(gemm_n);
        const bool g = graphs == "on";
        return dtype == "fp32" ? bench<float>(args, warmup_steps, !no_sr, g, measured_peak)
                               : bench<bf16>(args, warmup_steps, !no_sr, g, measured_peak);
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
