// safetensors.h: reading and writing the Hugging Face safetensors format.
//
// File layout: u64 little-endian N, then N bytes of JSON header
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "string", ...}}
// then the data block; offsets are relative to the start of the data block.
//
// The reader checks everything a damaged or hostile file could get wrong (header past
// the end, offsets that overlap or run past the end, sizes that disagree with shape and
// dtype) before any tensor is used, and reads tensors one at a time (pread), so a
// multi-GB checkpoint can be streamed layer by layer. Tensors convert to float or double
// on read; the writer takes float data and stores F32 or BF16.
//
// defines: DType, TensorInfo, SafeTensorsReader, SafeTensorsWriter, CheckpointTensors
#pragma once
#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>
#include "json.h"          // defines: Json
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

enum class DType { F32, BF16, F16, F64, I32, I64, U8 };

inline const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "F32";
        case DType::BF16: return "BF16";
        case DType::F16: return "F16";
        case DType::F64: return "F64";
        case DType::I32: return "I32";
        case DType::I64: return "I64";
        case DType::U8: return "U8";
    }
    return "?";
}
inline size_t dtype_size(DType t) {
    switch (t) {
        case DType::F32: case DType::I32: return 4;
        case DType::BF16: case DType::F16: return 2;
        case DType::F64: case DType::I64: return 8;
        case DType::U8: return 1;
    }
    return 0;
}
inline bool parse_dtype(const std::string& s, DType* out) {
    static const std::pair<const char*, DType> names[] = {
        {"F32", DType::F32}, {"BF16", DType::BF16}, {"F16", DType::F16}, {"F64", DType::F64},
        {"I32", DType::I32}, {"I64", DType::I64}, {"U8", DType::U8}};
    for (auto& p : names) if (s == p.first) { *out = p.second; return true; }
    return false;
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}
inline int64_t shape_numel(const std::vector<int64_t>& shape) {
    // a zero dimension first: [2^40, 2^40, 0] is empty, not an overflow
    for (int64_t d : shape) if (d == 0) return 0;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

struct TensorInfo {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;  // byte offsets within the data block
    int64_t numel() const { return shape_numel(shape); }
};

class SafeTensorsReader {
   public:
    std::string path;
    std::map<std::string, std::string> metadata;
    std::vector<TensorInfo> tensors;  // in file order of their data

    explicit SafeTensorsReader(const std::string& p) : path(p) {
        fd_ = open(p.c_str(), O_RDONLY);
        if (fd_ < 0) FAIL("%s: cannot open: %s", p.c_str(), strerror(errno));
        struct stat st;
        try {
            if (fstat(fd_, &st) != 0) fail("cannot stat: %s", strerror(errno));
            parse((uint64_t)st.st_size);
        } catch (...) {  // a constructor that throws gets no destructor: close the file here
            close(fd_);
            fd_ = -1;
            throw;
        }
    }
    // The same reader over bytes already in memory (`name` stands for the path in messages):
    // the fuzz harness (dev/fuzz) feeds it arbitrary bytes through the same checks.
    SafeTensorsReader(const std::string& name, std::vector<uint8_t> bytes) : path(name), mem_(std::move(bytes)) {
        parse(mem_.size());
    }
    ~SafeTensorsReader() { if (fd_ >= 0) close(fd_); }
    SafeTensorsReader(const SafeTensorsReader&) = delete;
    SafeTensorsReader& operator=(const SafeTensorsReader&) = delete;

    bool has(const std::string& name) const { return index_.count(name) > 0; }
    const TensorInfo& info(const std::string& name) const {
        auto it = index_.find(name);
        if (it == index_.end()) fail("missing tensor \"%s\"", name.c_str());
        return tensors[it->second];
    }

    // Reads a tensor into `out` (converted), checking its shape when `expect` is given.
    template <typename T>
    void read(const std::string& name, const std::vector<int64_t>& expect, T* out) const {
        const TensorInfo& ti = info(name);
        if (!expect.empty() && ti.shape != expect)
            fail("tensor \"%s\": expected shape %s, found %s", name.c_str(), shape_str(expect).c_str(),
                 shape_str(ti.shape).c_str());
        std::vector<uint8_t> raw(ti.end - ti.begin);
        read_raw(ti, raw.data());
        int64_t n = ti.numel();
        const uint8_t* r = raw.data();
        switch (ti.dtype) {
            case DType::F32: for (int64_t i = 0; i < n; i++) { float v; memcpy(&v, r + 4 * i, 4); out[i] = (T)v; } break;
            case DType::F64: for (int64_t i = 0; i < n; i++) { double v; memcpy(&v, r + 8 * i, 8); out[i] = (T)v; } break;
            case DType::BF16: for (int64_t i = 0; i < n; i++) { uint16_t v; memcpy(&v, r + 2 * i, 2); out[i] = (T)bf16_to_f32(v); } break;
            case DType::F16: for (int64_t i = 0; i < n; i++) { uint16_t v; memcpy(&v, r + 2 * i, 2); out[i] = (T)f16_to_f32(v); } break;
            case DType::I32: for (int64_t i = 0; i < n; i++) { int32_t v; memcpy(&v, r + 4 * i, 4); out[i] = (T)v; } break;
            case DType::I64: for (int64_t i = 0; i < n; i++) { int64_t v; memcpy(&v, r + 8 * i, 8); out[i] = (T)v; } break;
            case DType::U8: for (int64_t i = 0; i < n; i++) out[i] = (T)r[i]; break;
        }
        // One NaN or Inf in a checkpoint would silently train a model of NaNs (or, upcycled,
        // NaN experts): a float tensor must be finite, also after conversion to T.
        if (ti.dtype == DType::F32 || ti.dtype == DType::F64 || ti.dtype == DType::BF16 || ti.dtype == DType::F16) {
            for (int64_t i = 0; i < n; i++)
                if (!std::isfinite((double)out[i]))
                    fail("tensor \"%s\" holds a non-finite value (%g at flat index %lld of %lld): the file is damaged "
                         "or the run that wrote it diverged", name.c_str(), (double)out[i], (long long)i, (long long)n);
        }
    }
    template <typename T>
    std::vector<T> read_vec(const std::string& name, const std::vector<int64_t>& expect = {}) const {
        std::vector<T> v(info(name).numel());
        read(name, expect, v.data());
        return v;
    }
    void read_raw(const TensorInfo& ti, void* dst) const {
        if (!read_at(dst, ti.end - ti.begin, data_start_ + ti.begin))
            fail("tensor \"%s\": short read", ti.name.c_str());
    }

    template <typename... A>
    [[noreturn]] void fail(const char* fmt, A... a) const {
        throw Error(path + ": " + strfmt(fmt, a...));
    }
    [[noreturn]] void fail(const char* msg) const { throw Error(path + ": " + msg); }

   private:
    int fd_ = -1;               // the file, or -1 when reading from mem_
    std::vector<uint8_t> mem_;
    uint64_t data_start_ = 0;
    std::map<std::string, size_t> index_;

    // n bytes at offset off of the file (or memory); false if they are not all there
    bool read_at(void* dst, uint64_t n, uint64_t off) const {
        if (fd_ < 0) {
            if (off > mem_.size() || n > mem_.size() - off) return false;
            if (n) memcpy(dst, mem_.data() + off, n);
            return true;
        }
        uint64_t done = 0;
        while (done < n) {
            ssize_t r = pread(fd_, (char*)dst + done, n - done, off + done);
            if (r <= 0) return false;
            done += r;
        }
        return true;
    }

    // Reads and checks the header of a file of fsize bytes: fills metadata, tensors, index_.
    void parse(uint64_t fsize) {
        uint64_t hlen = 0;
        if (fsize < 8 || !read_at(&hlen, 8, 0))
            fail("file is %llu bytes, too short for the 8-byte header length", (unsigned long long)fsize);
        if (hlen > fsize - 8)
            fail("header length %llu runs past the end of the file (%llu bytes): truncated or not a safetensors file",
                 (unsigned long long)hlen, (unsigned long long)fsize);
        if (hlen > (100u << 20)) fail("header length %llu is implausibly large", (unsigned long long)hlen);
        std::string header(hlen, '\0');
        if (hlen && !read_at(&header[0], hlen, 8)) fail("cannot read the header");
        data_start_ = 8 + hlen;
        const uint64_t data_size = fsize - data_start_;
        Json h = Json::parse(header, path + " (safetensors header)");
        if (h.type != Json::OBJ) fail("header is not a JSON object");
        for (auto& kv : h.obj) {
            if (kv.first == "__metadata__") {
                if (kv.second.type != Json::OBJ) fail("__metadata__ is not an object");
                for (auto& m : kv.second.obj) {
                    if (m.second.type != Json::STR) fail("__metadata__ value for \"%s\" is not a string", m.first.c_str());
                    metadata[m.first] = m.second.str;
                }
                continue;
            }
            const Json& t = kv.second;
            const Json* dt = t.find("dtype");
            const Json* sh = t.find("shape");
            const Json* off = t.find("data_offsets");
            if (!dt || dt->type != Json::STR || !sh || sh->type != Json::ARR || !off || off->type != Json::ARR ||
                off->arr.size() != 2)
                fail("tensor \"%s\": header entry needs dtype, shape and data_offsets [begin, end]", kv.first.c_str());
            if (index_.count(kv.first)) fail("tensor \"%s\" appears twice in the header", kv.first.c_str());
            index_[kv.first] = 0;  // the real positions are set after sorting
            TensorInfo ti;
            ti.name = kv.first;
            if (!parse_dtype(dt->str, &ti.dtype))
                fail("tensor \"%s\": unsupported dtype \"%s\"", kv.first.c_str(), dt->str.c_str());
            // Sizes are checked against the bytes actually present before anything is
            // multiplied or cast, so no header can overflow an integer or cause an allocation
            // larger than the file. A zero dimension makes the others irrelevant.
            const uint64_t max_numel = data_size / dtype_size(ti.dtype);
            bool empty = false;
            for (auto& d : sh->arr) {
                if (d.type != Json::NUM || !(d.num >= 0) || d.num != std::floor(d.num) || d.num > 9007199254740992.0)
                    fail("tensor \"%s\": shape entries must be integers in [0, 2^53]", kv.first.c_str());
                empty = empty || d.num == 0;
            }
            uint64_t numel = 1;
            for (auto& d : sh->arr) {
                ti.shape.push_back((int64_t)d.num);
                if (empty) continue;
                if ((uint64_t)d.num > max_numel / numel)
                    fail("tensor \"%s\": shape %s needs more than the %llu bytes of data in the file",
                         kv.first.c_str(), shape_str(ti.shape).c_str(), (unsigned long long)data_size);
                numel *= (uint64_t)d.num;
            }
            for (auto& o : off->arr)
                if (o.type != Json::NUM || !(o.num >= 0) || o.num != std::floor(o.num))
                    fail("tensor \"%s\": bad data_offsets", kv.first.c_str());
            if (off->arr[1].num > (double)data_size)
                fail("tensor \"%s\": data_offsets [%.0f, %.0f] run past the end of the data (%llu bytes): truncated file?",
                     kv.first.c_str(), off->arr[0].num, off->arr[1].num, (unsigned long long)data_size);
            if (off->arr[1].num < off->arr[0].num) fail("tensor \"%s\": data_offsets end < begin", kv.first.c_str());
            ti.begin = (uint64_t)off->arr[0].num;
            ti.end = (uint64_t)off->arr[1].num;
            uint64_t want = empty ? 0 : numel * dtype_size(ti.dtype);
            if (ti.end - ti.begin != want)
                fail("tensor \"%s\": %s %s needs %llu bytes but data_offsets span %llu", kv.first.c_str(),
                     dtype_name(ti.dtype), shape_str(ti.shape).c_str(), (unsigned long long)want,
                     (unsigned long long)(ti.end - ti.begin));
            tensors.push_back(ti);
        }
        std::sort(tensors.begin(), tensors.end(),
                  [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
        // compare each non-empty tensor with the furthest-reaching one before it (not just its
        // neighbour: an empty tensor between two overlapping ones must not hide the overlap)
        size_t reach = SIZE_MAX;
        for (size_t i = 0; i < tensors.size(); i++) {
            if (tensors[i].end == tensors[i].begin) continue;
            if (reach != SIZE_MAX && tensors[i].begin < tensors[reach].end)
                fail("tensors \"%s\" and \"%s\" have overlapping data_offsets", tensors[reach].name.c_str(),
                     tensors[i].name.c_str());
            if (reach == SIZE_MAX || tensors[i].end > tensors[reach].end) reach = i;
        }
        for (size_t i = 0; i < tensors.size(); i++) index_[tensors[i].name] = i;
    }
};

// Streaming writer: declare every tensor first (so the header with all offsets can be
// written at once), then write each tensor's data in the declared order. Memory use is one
// tensor at a time. The file appears under its name only after finish() (AtomicFile).
class SafeTensorsWriter {
   public:
    std::map<std::string, std::string> metadata;

    void declare(const std::string& name, DType dtype, const std::vector<int64_t>& shape) {
        for (auto& t : plan_) if (t.name == name) FAIL("safetensors writer: tensor \"%s\" declared twice", name.c_str());
        TensorInfo t;
        t.name = name;
        t.dtype = dtype;
        t.shape = shape;
        t.begin = size_;
        t.end = size_ + (uint64_t)t.numel() * dtype_size(dtype);
        size_ = t.end;
        plan_.push_back(t);
    }
    void begin(const std::string& path) {
        file_.reset(new AtomicFile(path));
        Json h = Json::object();
        if (!metadata.empty()) {
            Json m = Json::object();
            for (auto& kv : metadata) m[kv.first] = kv.second;
            h["__metadata__"] = m;
        }
        for (auto& t : plan_) {
            Json e = Json::object();
            e["dtype"] = dtype_name(t.dtype);
            Json sh = Json::array();
            for (auto d : t.shape) sh.push(Json((long long)d));
            e["shape"] = sh;
            Json off = Json::array();
            off.push(Json((unsigned long long)t.begin));
            off.push(Json((unsigned long long)t.end));
            e["data_offsets"] = off;
            h[t.name] = e;
        }
        std::string hs = h.dump();
        while ((8 + hs.size()) % 8) hs += ' ';  // keep the data block 8-byte aligned
        uint64_t n = hs.size();
        file_->write(&n, 8);
        file_->write(hs);
        next_ = 0;
    }
    // `data` holds numel values of type T; they are converted to the declared dtype.
    template <typename T>
    void write(const std::string& name, const T* data) {
        if (!file_) FAIL("safetensors writer: write before begin");
        if (next_ >= plan_.size() || plan_[next_].name != name)
            FAIL("safetensors writer: tensor \"%s\" written out of the declared order", name.c_str());
        const TensorInfo& t = plan_[next_++];
        int64_t n = t.numel();
        std::vector<uint8_t> buf(t.end - t.begin);
        for (int64_t i = 0; i < n; i++) {
            switch (t.dtype) {
                case DType::F32: { float v = (float)data[i]; memcpy(&buf[4 * i], &v, 4); break; }
                case DType::F64: { double v = (double)data[i]; memcpy(&buf[8 * i], &v, 8); break; }
                case DType::BF16: { uint16_t v = f32_to_bf16((float)data[i]); memcpy(&buf[2 * i], &v, 2); break; }
                case DType::I32: { int32_t v = (int32_t)data[i]; memcpy(&buf[4 * i], &v, 4); break; }
                case DType::I64: { int64_t v = (int64_t)data[i]; memcpy(&buf[8 * i], &v, 8); break; }
                case DType::U8: buf[i] = (uint8_t)data[i]; break;
                case DType::F16: FAIL("safetensors writer: F16 output is not supported");
            }
        }
        file_->write(buf.data(), buf.size());
    }
    void finish() {
        if (next_ != plan_.size())
            FAIL("safetensors writer: %zu of %zu declared tensors were written", next_, plan_.size());
        file_->commit();
        file_.reset();
    }

   private:
    std::vector<TensorInfo> plan_;
    uint64_t size_ = 0;
    size_t next_ = 0;
    std::unique_ptr<AtomicFile> file_;
};

// A Hugging Face model directory's weights: either one model.safetensors or several
// shards listed in model.safetensors.index.json. Tensors are looked up across shards.
class CheckpointTensors {
   public:
    std::string dir;
    explicit CheckpointTensors(const std::string& d) : dir(d) {
        if (!is_dir(d)) FAIL("%s: checkpoint directory does not exist", d.c_str());
        std::string index = path_join(d, "model.safetensors.index.json");
        std::string single = path_join(d, "model.safetensors");
        if (path_exists(index)) {
            Json j = Json::parse_file(index);
            const Json* wm = j.find("weight_map");
            if (!wm || wm->type != Json::OBJ) FAIL("%s: no \"weight_map\" object", index.c_str());
            std::map<std::string, size_t> files;
            for (auto& kv : wm->obj) {
                if (kv.second.type != Json::STR) FAIL("%s: weight_map values must be file names", index.c_str());
                if (!files.count(kv.second.str)) {
                    files[kv.second.str] = readers_.size();
                    readers_.emplace_back(new SafeTensorsReader(path_join(d, kv.second.str)));
                }
                where_[kv.first] = files[kv.second.str];
            }
            for (size_t r = 0; r < readers_.size(); r++)
                for (auto& t : readers_[r]->tensors) if (!where_.count(t.name)) where_[t.name] = r;
        } else if (path_exists(single)) {
            readers_.emplace_back(new SafeTensorsReader(single));
            for (auto& t : readers_[0]->tensors) where_[t.name] = 0;
        } else {
            FAIL("%s: no model.safetensors (or model.safetensors.index.json) in this directory", d.c_str());
        }
    }
    bool has(const std::string& name) const { return where_.count(name) > 0; }
    std::vector<std::string> names() const {
        std::vector<std::string> v;
        for (auto& kv : where_) v.push_back(kv.first);
        return v;
    }
    const SafeTensorsReader& reader_of(const std::string& name) const {
        auto it = where_.find(name);
        if (it == where_.end())
            FAIL("%s: missing tensor \"%s\" (the config.json says the model has it)", dir.c_str(), name.c_str());
        return *readers_[it->second];
    }
    const TensorInfo& info(const std::string& name) const { return reader_of(name).info(name); }
    template <typename T>
    void read(const std::string& name, const std::vector<int64_t>& expect, T* out) const {
        reader_of(name).read(name, expect, out);
    }
    DType dtype() const {  // the dtype of the (first) weight tensor, to write outputs alike
        for (auto& r : readers_) if (!r->tensors.empty()) return r->tensors[0].dtype;
        return DType::F32;
    }

   private:
    std::vector<std::unique_ptr<SafeTensorsReader>> readers_;
    std::map<std::string, size_t> where_;
};
