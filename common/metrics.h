// metrics.h: metrics.jsonl, one JSON object per line (step, tokens, losses, lr, ...).
// On resume, lines from steps after the checkpoint (a run that crashed later) are dropped,
// so the file reads as if the run had never been interrupted.
//
// defines: MetricsLog
#pragma once
#include <string>
#include "json.h"          // defines: Json
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

class MetricsLog {
   public:
    MetricsLog() {}
    // resume_step < 0: start a new file; otherwise keep what the run had logged up to resume_step
    void open(const std::string& path, long resume_step) {
        path_ = path;
        std::string kept;
        if (resume_step >= 0 && path_exists(path)) {
            std::string text = read_text(path);
            size_t start = 0;
            while (start < text.size()) {
                size_t nl = text.find('\n', start);
                if (nl == std::string::npos) break;  // drop a torn last line
                std::string line = text.substr(start, nl - start);
                start = nl + 1;
                try {
                    Json j = Json::parse(line, path);
                    // the eval record at the resume step is written again by the resumed run
                    double st = j.get_num("step", -1, path);
                    if (st < resume_step || (st == resume_step && !j.has("val"))) kept += line + "\n";
                } catch (const Error&) {
                }
            }
        }
        write_text_atomic(path, kept);
        f_ = fopen(path.c_str(), "ab");
        if (!f_) FAIL("%s: cannot open for appending: %s", path.c_str(), strerror(errno));
    }
    void write(const Json& record) {
        if (!f_) return;
        std::string line = record.dump() + "\n";
        fwrite(line.data(), 1, line.size(), f_);
        fflush(f_);
    }
    ~MetricsLog() { if (f_) fclose(f_); }

   private:
    std::string path_;
    FILE* f_ = nullptr;
};
