/*
generate.cpp: text from a trained model (CPU), with a KV cache: prompts through the model's
tokenizer.json, greedy / temperature / top-p sampling with a seed, a batch of prompts at
once, stopping at end-of-text. The model code is the CPU trainer's (train_moe.cpp: Model,
forward_cached); decoding with the cache gives the logits a full forward pass over the whole
context would (test_cpu "KV cache").

  ./generate --model runs/moe --prompt "The king said" --max-tokens 64 --temperature 0.8 --top-p 0.95
  ./generate --model runs/moe --prompts prompts.txt --temperature 0     (greedy, one prompt per line)

Each prompt starts after an end-of-text token (a document boundary, as in training). Prompt b
samples from its own random stream (--seed + b), so its text does not depend on the others.
Prints each prompt's text, then the prefill and decode speed.
*/
#define TRAIN_MOE_NO_MAIN
#include "train_moe.cpp"
#include <sys/resource.h>
#include "common/bpe.h"  // defines: BpeTokenizer

struct GenOptions {
    std::string model, prompt, prompts_file, tokenizer;
    int max_tokens = 64, threads = 0;
    double temperature = 1.0, top_p = 1.0;
    long seed = 1337;
    bool no_stop = false;
};

int main(int argc, char** argv) {
    GenOptions o;
    Cli cli("generate", "Text from a trained model on the CPU, with a KV cache (the CPU trainer's model code).\n"
                        "Example: ./generate --model runs/moe --prompt \"The king said\" --temperature 0.8 --top-p 0.95");
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
        Model M;
        M.training = false;  // weights only
        M.load(dir);
        const int V = M.cfg.vocab_size, nb = (int)prompts.size();
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
        if (T_cache > M.cfg.max_seq_len)
            fprintf(stderr, "warning: up to %d positions, beyond the model's max_position_embeddings %d\n", T_cache,
                    M.cfg.max_seq_len);
        KVCache cache;
        cache.init(M.cfg, nb, T_cache);

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
            const real* z = M.forward_cached(cache, ctx[b].data(), &zero, b, 1, n);
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
            const real* z = M.forward_cached(cache, next.data(), pos.data(), 0, nb, 1);  // finished rows run along
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
        double kv_mb = 2.0 * M.cfg.n_layer * nb * T_cache * M.cfg.kv_dim() * sizeof(real) / 1e6;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);  // ru_maxrss: peak resident memory in kB
        fprintf(stderr, "prefill %ld tokens in %.3f s (%.0f tok/s); decode %ld tokens in %.3f s (%.0f tok/s, batch %d); "
                "weights %.1f MB, KV cache %.1f MB, peak memory %.1f MB\n", prefill_tokens, t1 - t0,
                prefill_tokens / std::max(t1 - t0, 1e-9), decoded, t2 - t1, decoded / std::max(t2 - t1, 1e-9), nb,
                M.params.size() * sizeof(real) / 1e6, kv_mb, ru.ru_maxrss / 1e3);
        return 0;
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
