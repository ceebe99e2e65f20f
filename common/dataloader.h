// dataloader.h: token shards (llm.c format) from several domains, mixed by weight.
//
// Shard format: 256 x int32 header (magic 20240520, version 1, token count), then
// uint16 tokens. A data directory holds <domain>_train_NNN.bin and <domain>_val_NNN.bin
// files (plus tokenizer.bin); the domain is the part of the name before "_train_"/"_val_",
// so llm.c's own shards (fineweb_train_000001.bin) work too.
//
// Training order: each domain's train tokens are cut into sequences of T+1 tokens at stride
// T; every epoch visits them in a fresh permutation drawn from (seed, domain, epoch). Each
// batch row first picks a domain with probability proportional to its weight (RNG keyed by
// the row's global index), then takes that domain's next sequence. The whole position is a
// handful of integers (DataState), saved with checkpoints so that a resumed run sees
// exactly the batches the uninterrupted run would have seen.
//
// Validation: each domain's val shards cut at stride T, read in order, never shuffled.
//
// defines: DataLoader, DataState, Domain, DomainFiles, discover_domains, write_shard
#pragma once
#include <string>
#include <vector>
#include "json.h"          // defines: Json
#include "rng.h"           // defines: stream_id, rng_normal, RngStream
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

static const int SHARD_MAGIC = 20240520;
static const int SHARD_VERSION = 1;

// Checks a shard's 1024-byte header against the size of the whole file and returns the
// token count. The count is checked against the bytes present before anything is allocated:
// a damaged header must not make the loader ask for gigabytes.
inline size_t shard_token_count(const int32_t h[256], uint64_t file_bytes, const std::string& path) {
    if (h[0] != SHARD_MAGIC)
        FAIL("%s: bad magic %d (expected %d): not an llm.c token shard", path.c_str(), h[0], SHARD_MAGIC);
    if (h[1] != SHARD_VERSION)
        FAIL("%s: shard version %d is not supported (expected %d: uint16 tokens)", path.c_str(), h[1], SHARD_VERSION);
    if (h[2] < 0) FAIL("%s: negative token count %d in header", path.c_str(), h[2]);
    uint64_t body = file_bytes - 1024, want = 2ull * (uint64_t)h[2];
    if (body < want)
        FAIL("%s: header says %d tokens (%llu bytes) but the body has only %llu tokens: truncated shard", path.c_str(),
             h[2], (unsigned long long)want, (unsigned long long)(body / 2));
    if (body > want) FAIL("%s: file has bytes beyond the %d tokens its header announces", path.c_str(), h[2]);
    return (size_t)h[2];
}
inline void check_shard_tokens(const std::vector<uint16_t>& toks, int vocab_size, const std::string& path) {
    for (size_t i = 0; i < toks.size(); i++)
        if (toks[i] >= vocab_size)
            FAIL("%s: token id %d at position %zu >= vocab size %d (shard made with another tokenizer?)", path.c_str(),
                 toks[i], i, vocab_size);
}

// A shard from bytes in memory (`path` names it in messages), with the checks of load_shard.
inline std::vector<uint16_t> parse_shard(const uint8_t* bytes, size_t n, int vocab_size, const std::string& path) {
    if (n < 1024) FAIL("%s: file is shorter than the 1024-byte shard header", path.c_str());
    int32_t h[256];
    memcpy(h, bytes, sizeof(h));
    std::vector<uint16_t> toks(shard_token_count(h, n, path));
    if (!toks.empty()) memcpy(toks.data(), bytes + 1024, 2 * toks.size());
    check_shard_tokens(toks, vocab_size, path);
    return toks;
}

// Loads a whole shard (checked: magic, version, size, every token < vocab). Reads the tokens
// straight into their vector: shards can be hundreds of MB.
inline std::vector<uint16_t> load_shard(const std::string& path, int vocab_size) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) FAIL("%s: cannot open token shard: %s", path.c_str(), strerror(errno));
    struct stat st;
    int32_t h[256];
    if (fstat(fileno(f), &st) != 0 || st.st_size < 1024 || fread(h, 4, 256, f) != 256) {
        fclose(f);
        FAIL("%s: file is shorter than the 1024-byte shard header", path.c_str());
    }
    std::vector<uint16_t> toks;
    try {
        toks.resize(shard_token_count(h, (uint64_t)st.st_size, path));
    } catch (...) {
        fclose(f);
        throw;
    }
    size_t n = toks.empty() ? 0 : fread(toks.data(), 2, toks.size(), f);
    fclose(f);
    if (n != toks.size())  // the file shrank after fstat
        FAIL("%s: header says %zu tokens but only %zu could be read: truncated shard", path.c_str(), toks.size(), n);
    check_shard_tokens(toks, vocab_size, path);
    return toks;
}

// Writes a shard (atomically). Used by tests and tools that make small shards.
inline void write_shard(const std::string& path, const std::vector<uint16_t>& toks) {
    int32_t h[256] = {0};
    h[0] = SHARD_MAGIC; h[1] = SHARD_VERSION; h[2] = (int32_t)toks.size();
    AtomicFile f(path);
    f.write(h, sizeof(h));
    f.write(toks.data(), toks.size() * 2);
    f.commit();
}

struct DomainFiles {
    std::string name;
    std::vector<std::string> train, val;
};

// Finds the domains of a data directory. Domains without train shards are still listed
// (they may be validation-only); the caller decides what it needs.
inline std::vector<DomainFiles> discover_domains(const std::string& dir) {
    if (!path_exists(dir)) FAIL("%s: data directory does not exist", dir.c_str());
    if (!is_dir(dir)) FAIL("%s: is not a directory (expected a folder of <domain>_train_NNN.bin shards)", dir.c_str());
    std::vector<DomainFiles> out;
    auto domain_of = [&](const std::string& name, const std::string& split) -> DomainFiles& {
        for (auto& d : out) if (d.name == name) return d;
        out.push_back(DomainFiles{name, {}, {}});
        (void)split;
        return out.back();
    };
    for (auto& f : list_dir(dir)) {
        if (f.size() < 5 || f.substr(f.size() - 4) != ".bin") continue;
        size_t t = f.find("_train_"), v = f.find("_val_");
        if (t != std::string::npos && t > 0) domain_of(f.substr(0, t), "train").train.push_back(path_join(dir, f));
        else if (v != std::string::npos && v > 0) domain_of(f.substr(0, v), "val").val.push_back(path_join(dir, f));
    }
    if (out.empty()) FAIL("%s: no token shards named <domain>_train_NNN.bin or <domain>_val_NNN.bin", dir.c_str());
    return out;
}

struct DataState {
    uint64_t rows_drawn = 0;        // global index of the next batch row
    std::vector<uint64_t> epoch;    // per domain
    std::vector<uint64_t> pos;      // per domain: next index into the epoch's permutation
    Json to_json() const {
        Json j = Json::object();
        j["rows_drawn"] = (unsigned long long)rows_drawn;
        Json e = Json::array(), p = Json::array();
        for (auto x : epoch) e.push((unsigned long long)x);
        for (auto x : pos) p.push((unsigned long long)x);
        j["epoch"] = e;
        j["pos"] = p;
        return j;
    }
    static DataState from_json(const Json& j, size_t n_domains, const std::string& what) {
        // counters are integers in [0, 2^53]; a cast of anything else to uint64_t is undefined
        auto counter = [&](const Json& v, const char* key) {
            if (v.type != Json::NUM || !(v.num >= 0))
                FAIL("%s: data loader state \"%s\" should hold non-negative integers", what.c_str(), key);
            return (uint64_t)Json::checked_int(v.num, key, what);
        };
        DataState s;
        const Json* r = j.find("rows_drawn");
        if (!r) FAIL("%s: data loader state lacks \"rows_drawn\"", what.c_str());
        s.rows_drawn = counter(*r, "rows_drawn");
        const Json* e = j.find("epoch");
        const Json* p = j.find("pos");
        if (!e || !p || e->type != Json::ARR || p->type != Json::ARR || e->arr.size() != n_domains ||
            p->arr.size() != n_domains)
            FAIL("%s: data loader state has %zu domains' positions but the data has %zu domains", what.c_str(),
                 e ? e->arr.size() : 0, n_domains);
        for (size_t i = 0; i < n_domains; i++) {
            s.epoch.push_back(counter(e->arr[i], "epoch"));
            s.pos.push_back(counter(p->arr[i], "pos"));
        }
        return s;
    }
};

struct Domain {
    std::string name;
    double weight = 0;
    std::vector<uint16_t> train;  // all train shards concatenated
    std::vector<uint16_t> val;
    uint64_t n_train_seq = 0, n_val_seq = 0;
    std::vector<uint32_t> perm;  // this epoch's order of train sequences
    uint64_t perm_epoch = ~0ull;
};

class DataLoader {
   public:
    int B = 0, T = 0;
    uint64_t seed = 0;
    std::vector<Domain> domains;
    DataState state;

    // `mix`: "en=1,code=2" weights by domain name; empty = all domains with train data,
    // equal weights. Domains given weight 0 (or left out of a non-empty mix) are not trained
    // on, but are still evaluated if they have validation shards.
    DataLoader(const std::string& dir, const std::string& mix, int B_, int T_, int vocab_size, uint64_t seed_)
        : B(B_), T(T_), seed(seed_) {
        std::vector<DomainFiles> files = discover_domains(dir);
        std::vector<std::pair<std::string, double>> weights;
        if (!mix.empty()) {
            size_t start = 0;
            while (start <= mix.size()) {
                size_t comma = mix.find(',', start);
                std::string item = mix.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
                size_t eq = item.find('=');
                std::string name = item.substr(0, eq);
                double w = eq == std::string::npos ? 1.0 : parse_double_strict(item.substr(eq + 1), 1e300, "--mix: weight of domain \"" + name + "\"");
                if (w < 0) FAIL("--mix: weight of domain \"%s\" is negative", name.c_str());
                bool found = false;
                for (auto& f : files) if (f.name == name) found = true;
                if (!found) {
                    std::string have;
                    for (auto& f : files) have += (have.empty() ? "" : ", ") + f.name;
                    FAIL("--mix: no domain \"%s\" in %s (found: %s)", name.c_str(), dir.c_str(), have.c_str());
                }
                weights.push_back({name, w});
                if (comma == std::string::npos) break;
                start = comma + 1;
            }
        }
        for (auto& f : files) {
            Domain d;
            d.name = f.name;
            d.weight = mix.empty() ? (f.train.empty() ? 0.0 : 1.0) : 0.0;
            for (auto& w : weights) if (w.first == f.name) d.weight = w.second;
            if (d.weight > 0 && f.train.empty())
                FAIL("%s: domain \"%s\" has a mixture weight but no %s_train_NNN.bin shard", dir.c_str(),
                     f.name.c_str(), f.name.c_str());
            for (auto& p : f.train) if (d.weight > 0) { auto t = load_shard(p, vocab_size); d.train.insert(d.train.end(), t.begin(), t.end()); }
            for (auto& p : f.val) { auto t = load_shard(p, vocab_size); d.val.insert(d.val.end(), t.begin(), t.end()); }
            d.n_train_seq = d.train.size() > (size_t)T ? (d.train.size() - 1) / T : 0;
            d.n_val_seq = d.val.size() > (size_t)T ? (d.val.size() - 1) / T : 0;
            if (d.weight > 0 && d.n_train_seq == 0)
                FAIL("%s: domain \"%s\" has %zu train tokens, fewer than one sequence of %d+1", dir.c_str(),
                     f.name.c_str(), d.train.size(), T);
            domains.push_back(std::move(d));
        }
        double total = 0;
        for (auto& d : domains) total += d.weight;
        if (total <= 0) FAIL("%s: no domain to train on (all mixture weights are zero?)", dir.c_str());
        for (auto& d : domains) d.weight /= total;
        state.epoch.assign(domains.size(), 0);
        state.pos.assign(domains.size(), 0);
    }

    // Next training batch: inputs/targets [B, T]; domain_of_row [B] (may be null).
    void next_batch(int* inputs, int* targets, int* domain_of_row = nullptr) {
        for (int b = 0; b < B; b++) {
            int d = pick_domain(state.rows_drawn++);
            Domain& D = domains[d];
            if (state.pos[d] >= D.n_train_seq) { state.epoch[d]++; state.pos[d] = 0; }
            ensure_perm(d);
            uint64_t start = (uint64_t)D.perm[state.pos[d]++] * T;
            for (int t = 0; t < T; t++) {
                inputs[b * T + t] = D.train[start + t];
                targets[b * T + t] = D.train[start + t + 1];
            }
            if (domain_of_row) domain_of_row[b] = d;
        }
    }

    // Validation batch i of domain d (rows wrap around when the split is small);
    // returns false when the domain has no validation sequence.
    bool val_batch(int d, int i, int* inputs, int* targets) const {
        const Domain& D = domains[d];
        if (D.n_val_seq == 0) return false;
        for (int b = 0; b < B; b++) {
            uint64_t s = ((uint64_t)i * B + b) % D.n_val_seq;
            for (int t = 0; t < T; t++) {
                inputs[b * T + t] = D.val[s * T + t];
                targets[b * T + t] = D.val[s * T + t + 1];
            }
        }
        return true;
    }
    // How many distinct validation batches a domain has (at least 1 when it has any data).
    int val_batches(int d) const {
        const Domain& D = domains[d];
        if (D.n_val_seq == 0) return 0;
        return (int)std::max<uint64_t>(1, D.n_val_seq / B);
    }

   private:
    int pick_domain(uint64_t row) const {
        float u = rng_uniform(seed, stream_id(PURPOSE_DATA, 0xffff), row);
        double acc = 0;
        int last = -1;
        for (size_t d = 0; d < domains.size(); d++) {
            if (domains[d].weight <= 0) continue;
            acc += domains[d].weight;
            last = (int)d;
            if (u < acc) return (int)d;
        }
        return last;
    }
    void ensure_perm(int d) {
        Domain& D = domains[d];
        if (D.perm_epoch == state.epoch[d]) return;
        D.perm.resize(D.n_train_seq);
        for (uint64_t i = 0; i < D.n_train_seq; i++) D.perm[i] = (uint32_t)i;
        RngStream r(seed, stream_id(PURPOSE_DATA, (uint32_t)d, (uint32_t)state.epoch[d]));
        for (uint64_t i = D.n_train_seq - 1; i > 0; i--) std::swap(D.perm[i], D.perm[r.below(i + 1)]);
        D.perm_epoch = state.epoch[d];
    }
};
