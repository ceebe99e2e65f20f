/*
generate.cpp: text from a trained model, with a KV cache: prompts through the model's
tokenizer.json, greedy / temperature / top-p sampling with a seed, a batch of prompts at
once, stopping at end-of-text. One program, two builds:
  ./generate       the CPU trainer's model code (train_moe.cpp: Model, forward_cached)
  ./generate_gpu   the GPU trainer's (train_moe.cu: GPUModel, forward_cached), built by nvcc
                   from this file with -DGENERATE_GPU; --dtype bf16 (default) or fp32
Decoding with the cache gives the logits a full forward pass over the whole context would
(test_cpu and test_gpu_fixtures "KV cache").

  ./generate --model runs/moe --prompt "The king said" --max-tokens 64 --temperature 0.8 --top-p 0.95
  ./generate --model runs/moe --prompts prompts.txt --temperature 0     (greedy, one prompt per line)

Each prompt starts after an end-of-text token (a document boundary, as in training). Prompt b
samples from its own random stream (--seed + b), so its text does not depend on the others.
Prints each prompt's text, then the prefill and decode speed.
*/
#define TRAIN_MOE_NO_MAIN
#ifdef GENERATE_GPU
#include "train_moe.cu"
#else
#include "train_moe.cpp"
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include <sys/resource.h>
#include "common/bpe.h"  // defines: BpeTokenizer

struct GenOptions {
    std::string model, prompt, prompts_file, tokenizer;
    int max_tokens = 64, threads = 0;
    double temperature = 1.0, top_p = 1.0;
    long seed = 1337;
    bool no_stop = false;
    std::string dtype = "bf16";  // generate_gpu
    int device = 0;              // generate_gpu
};

// Prefill every prompt, then decode all of them together, one token per step; prints the
// texts and, on stderr, the speed and memory. M: Model (CPU) or GPUModel<T> (GPU), loaded.
template <typename M>
void generate_text(M& model, const GenOptions& o, const BpeTokenizer& tok, const std::vector<std::string>& prompts,
                   const std::string& tok_path) {
    const ModelConfig& cfg = model.cfg;
    const int V = cfg.vocab_size, nb = (int)prompts.size();
    int eot = -1;
    for (auto& s : tok.specials) if (s.first == "<|endoftext|>") eot = s.second;
    if (eot < 0 || eot >= V) FAIL("%s: no <|endoftext|> token inside the model's vocabulary of %d", tok_path.c_str(), V);

    // the contexts: end-of-text, then the prompt
    std::vector<std::vector<int>> ctx(nb);
    int longest = 0;
    for (int b = 0; b < nb; b++) {
        ctx[b].push_back(eot);
        for (int id : tok.encode(prompts[b])) {
            if (id >= V) FAIL("prompt %d: token %d is outside the model's vocabulary of %d", b + 1, id, V);
            ctx[b].push_back(id);
        }
        longest = std::max(longest, (int)ctx[b].size());
    }
    const int T_cache = longest + o.max_tokens;
    if (T_cache > cfg.max_seq_len)
        fprintf(stderr, "warning: up to %d positions, beyond the model's max_position_embeddings %d\n", T_cache,
                cfg.max_seq_len);
#ifdef GENERATE_GPU
    model.alloc(std::max(nb, 1), longest);  // activations for the largest forward: one whole prompt, or nb tokens
#endif
    typename M::Cache cache;
    cache.init(cfg, nb, T_cache);

    // prefill: each prompt alone into its cache row; its last logits give the first token
    std::vector<RngStream> rng;
    for (int b = 0; b < nb; b++) rng.emplace_back((uint64_t)(o.seed + b), stream_id(PURPOSE_SAMPLE));
    std::vector<int> next(nb), pos(nb);
    std::vector<bool> done(nb, false);
    std::vector<std::string> text(nb);
    double t0 = now_seconds();
    long prefill_tokens = 0;
    for (int b = 0; b < nb; b++) {
        int zero = 0, n = (int)ctx[b].size();
        const auto* z = model.forward_cached(cache, ctx[b].data(), &zero, b, 1, n);
        next[b] = sample_token(z + (size_t)(n - 1) * V, V, o.temperature, o.top_p, rng[b]);
        pos[b] = n;
        prefill_tokens += n;
    }
    double t1 = now_seconds();
    // decode: every sequence one token per step, all in one batch
    long decoded = 0;
    for (int step = 0; step < o.max_tokens; step++) {
        bool any = false;
        for (int b = 0; b < nb; b++) {
            if (done[b]) continue;
            if (next[b] == eot && !o.no_stop) { done[b] = true; continue; }
            text[b] += tok.decode(next[b]);
            any = true;
        }
        if (!any || step + 1 == o.max_tokens) break;
        const auto* z = model.forward_cached(cache, next.data(), pos.data(), 0, nb, 1);  // finished rows run along
        for (int b = 0; b < nb; b++) {
            pos[b]++;
            if (!done[b]) next[b] = sample_token(z + (size_t)b * V, V, o.temperature, o.top_p, rng[b]);
        }
        decoded += nb;
    }
    double t2 = now_seconds();
    for (int b = 0; b < nb; b++)
        printf("%s[%s]%s\n", nb > 1 ? strfmt("%d: ", b + 1).c_str() : "", printable(prompts[b]).c_str(),
               printable(text[b]).c_str());
#ifdef GENERATE_GPU
    const size_t elt = o.dtype == "fp32" ? 4 : 2;  // the weight copy the forward reads, and the cache
    size_t free_b = 0, total_b = 0;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    const std::string peak = strfmt("GPU memory in use %.1f MB", (total_b - free_b) / 1e6);
#else
    const size_t elt = sizeof(real);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);  // ru_maxrss: peak resident memory in kB
    const std::string peak = strfmt("peak memory %.1f MB", ru.ru_maxrss / 1e3);
#endif
    const double kv_mb = 2.0 * cfg.n_layer * nb * T_cache * cfg.kv_dim() * elt / 1e6;
    fprintf(stderr, "prefill %ld tokens in %.3f s (%.0f tok/s); decode %ld tokens in %.3f s (%.0f tok/s, batch %d); "
            "weights %.1f MB, KV cache %.1f MB, %s\n", prefill_tokens, t1 - t0,
            prefill_tokens / std::max(t1 - t0, 1e-9), decoded, t2 - t1, decoded / std::max(t2 - t1, 1e-9), nb,
            model.layout.total * elt / 1e6, kv_mb, peak.c_str());
}

int main(int argc, char** argv) {
    GenOptions o;
#ifdef GENERATE_GPU
    Cli cli("generate_gpu", "Text from a trained model on a GPU, with a KV cache (the GPU trainer's model code).\n"
                            "Example: ./generate_gpu --model runs/moe --prompt \"The king said\" --temperature 0.8 --top-p 0.95");
#else
    Cli cli("generate", "Text from a trained model on the CPU, with a KV cache (the CPU trainer's model code).\n"
                        "Example: ./generate --model runs/moe --prompt \"The king said\" --temperature 0.8 --top-p 0.95");
#endif
    cli.add("--model", &o.model, "a model directory (checkpoint, Hugging Face Llama/Mixtral directory) or a run directory");
    cli.add("--prompt", &o.prompt, "the text to continue (empty: start a new document)");
    cli.add("--prompts", &o.prompts_file, "a file of prompts, one per line, generated as one batch");
    cli.add("--tokenizer", &o.tokenizer, "tokenizer.json (default: the model directory's)");
    cli.add("--max-tokens", &o.max_tokens, "tokens to generate per prompt", Range::between(1, 1 << 20));
    cli.add("--temperature", &o.temperature, "softmax temperature; 0 = greedy", Range::between(0, 100));
    cli.add("--top-p", &o.top_p, "nucleus sampling: keep the most likely tokens up to this probability", Range::between(0, 1));
    cli.add("--seed", &o.seed, "random seed (prompt b uses seed + b)");
    cli.add("--threads", &o.threads, "OpenMP threads (0 = all)", Range::at_least(0));
    cli.flag("--no-stop", &o.no_stop, "do not stop at end-of-text");
#ifdef GENERATE_GPU
    cli.add("--dtype", &o.dtype, "bf16 (bf16 weights and activations, fp32 accumulation) or fp32");
    cli.add("--device", &o.device, "CUDA device index");
#endif
    try {
        cli.parse(argc, argv);
        if (o.model.empty()) FAIL("--model is required (a model or run directory)");
#ifdef _OPENMP
        if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
        std::string dir = o.model;
        if (!path_exists(path_join(dir, "config.json")) && path_exists(path_join(dir, "latest"))) dir = resolve_resume_dir(dir);
        if (!path_exists(path_join(dir, "config.json"))) FAIL("%s: no config.json (not a model or run directory)", o.model.c_str());
        BpeTokenizer tok;
        const std::string tok_path = o.tokenizer.empty() ? path_join(dir, "tokenizer.json") : o.tokenizer;
        if (!path_exists(tok_path)) FAIL("%s: tokenizer not found (give --tokenizer PATH to the corpus's tokenizer.json)", tok_path.c_str());
        tok.load(tok_path);
        std::vector<std::string> prompts;
        if (!o.prompts_file.empty()) {
            if (!o.prompt.empty()) FAIL("--prompt and --prompts: give one of them");
            std::string text = read_text(o.prompts_file);
            size_t a = 0;
            while (a < text.size()) {
                size_t e = text.find('\n', a);
                if (e == std::string::npos) e = text.size();
                prompts.push_back(text.substr(a, e - a));
                a = e + 1;
            }
            if (prompts.empty()) FAIL("%s: no prompts (one per line)", o.prompts_file.c_str());
        } else {
            prompts.push_back(o.prompt);
        }
#ifdef GENERATE_GPU
        if (o.dtype != "bf16" && o.dtype != "fp32") FAIL("--dtype must be bf16 or fp32, found \"%s\"", o.dtype.c_str());
        int ndev = 0;
        cudaCheck(cudaGetDeviceCount(&ndev));
        if (o.device < 0 || o.device >= ndev) FAIL("--device %d: this machine has %d CUDA device(s)", o.device, ndev);
        cudaCheck(cudaSetDevice(o.device));
        auto run = [&](auto& M) {
            M.stochastic_round = false;  // the bf16 weight copy rounded to nearest
            M.load(dir);
            generate_text(M, o, tok, prompts, tok_path);
        };
        if (o.dtype == "fp32") { GPUModel<float> M; run(M); }
        else { GPUModel<bf16> M; run(M); }
#else
        Model M;
        M.training = false;  // weights only
        M.load(dir);
        generate_text(M, o, tok, prompts, tok_path);
#endif
        return 0;
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
