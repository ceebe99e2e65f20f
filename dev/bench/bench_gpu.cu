/*
dev/bench/bench_gpu.cu: the GPU trainer's throughput on one configuration (dev/bench/bench.sh
runs the table). It is train_moe.cu's own GPUModel and training step, timed: WARMUP untimed
steps (cuBLAS heuristics, shared-memory attributes, caches), then --steps timed steps between
two device synchronizations. Prints one line:
  bench: <dense|MoE> | N steps of T tokens | ms/step | tok/s | MFU | GPU memory in use | last loss
MFU counts 6 N_active + causal attention FLOPs per token over the device's dense bf16 peak
(docs/perf.md); "n/a" on a device the peak table does not know.
Data: the shards of --data when it has them, else uniform random tokens (--vocab sets the size).
Writes no files.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cu"

template <typename T>
int bench(TrainArgs& args, int warmup_steps, bool stochastic_round) {
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
    M.setup(cfg, host, {});
    M.alloc(args.batch, args.seq);
    printf("device: %s (%s)\n", prop.name, sizeof(T) == 4 ? "fp32" : "bf16 mixed precision");
    print_model_summary(cfg, M.router_loss);
    printf("; activations %.2f GiB\n", M.act_bytes / 1073741824.0);

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
    printf("bench: %s | %d steps of %.0f tokens | %.1f ms/step | %.0f tok/s | MFU %s | GPU memory in use %.2f GiB | "
           "last loss %.4f\n",
           cfg.is_moe() ? "MoE" : "dense", args.steps, tokens_per_step, dt * 1e3, tokens_per_step / dt,
           peak > 0 ? strfmt("%.1f%%", 100 * flops_step / dt / peak).c_str() : "n/a (unknown device)",
           (total_b - free_b) / 1073741824.0, last.loss);
    return std::isfinite(last.loss) ? 0 : 1;
}

int main(int argc, char** argv) {
    TrainArgs args;
    std::string dtype = "bf16";
    int warmup_steps = 3;
    bool no_sr = false;
    Cli cli("bench_gpu", "Throughput of the GPU trainer on one configuration (no files written).\n"
                         "Example: ./build/bench_gpu --model d768 --batch 8 --seq 1024 --steps 10 --experts 8 --topk 2");
    args.add_to(cli);
    cli.section("Benchmark");
    cli.add("--dtype", &dtype, "bf16 or fp32");
    cli.add("--warmup-steps", &warmup_steps, "untimed steps before the timed --steps");
    cli.flag("--no-stochastic-rounding", &no_sr, "bf16: round the weight copy to nearest");
    try {
        cli.parse(argc, argv);
        args.validate();
        if (dtype != "bf16" && dtype != "fp32") FAIL("--dtype must be bf16 or fp32, found \"%s\"", dtype.c_str());
        if (warmup_steps < 0) FAIL("--warmup-steps must be >= 0, found %d", warmup_steps);
        return dtype == "fp32" ? bench<float>(args, warmup_steps, !no_sr) : bench<bf16>(args, warmup_steps, !no_sr);
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
