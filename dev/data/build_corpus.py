#!/usr/bin/env python3
"""Build the multi-domain training corpus, tokenizer and token shards from Debian packages.

    python3 dev/data/build_corpus.py                 # full build  -> data/full/  (make data)
    python3 dev/data/build_corpus.py --tiny          # tiny build  -> data/tiny/  (make data-tiny)
    python3 dev/data/build_corpus.py --help

Steps (see dev/data/README.md for the sources and the numbers):
  1. fetch: `apt-get download` + `dpkg-deb -x` every package of sources.SOURCES into
     data/cache/ (shared by the full and the tiny build; nothing is installed);
  2. extract documents (book chapter, source file, man page, help page) and clean them:
     Gutenberg boilerplate stripped, hard-wrapped paragraphs unwrapped, German paragraphs
     kept only if a stop-word vote says German, exact duplicate paragraphs (>= 40 chars)
     removed per domain (for code: exact duplicate files), code filter (sources.py);
  3. split: documents are cut into ~16 KB chunks at paragraph boundaries; a chunk goes
     to validation when sha256("domain:document:chunk-index") falls below 2% (4% for the
     smallest domain); consecutive chunks of one document in the same split stay one
     document;
  4. train a byte-level BPE (Hugging Face `tokenizers`) on an equal-size sample of each
     domain's train split; <|endoftext|> is token id 0; write tokenizer.json and the
     llm.c-style decode table tokenizer.bin;
  5. write llm.c token shards <domain>_<split>_<NNN>.bin (every document preceded by
     <|endoftext|>), summary.json, and print a summary table.

The output is byte-identical from run to run (sorted file lists, no timestamps, no
randomness except sha256 of names). Every output file is written to a temp name and
renamed, so an interrupted build never leaves a half-written file that looks valid.
"""

import argparse
import hashlib
import importlib
import json
import os
import re
import struct
import subprocess
import sys
import time
import unicodedata
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sources  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOT = "<|endoftext|>"
EOT_ID = 0
SHARD_MAGIC, SHARD_VERSION = 20240520, 1
TOK_MAGIC, TOK_VERSION = 20240328, 2
DEDUP_MIN_CHARS = 40
MAX_TOKEN_CHARS = 128  # BPE merges stop at this many bytes (tokenizer.bin allows 255)
MIN_DOC_CHARS = 100

DE_STOP = set("""der die das und ist nicht ein eine einen einem einer eines zu den dem des mit
von auf für im in auch sich es sie wird werden wenn oder aber als bei nach wie nur noch
kann können sind war dass daß diese dieser dieses durch über unter zum zur vom aus hat
haben wurde kein keine ihr ihre sein seine man sehr schon hier dann also mehr""".split())
EN_STOP = set("""the and is are of to in it that this for with on as be by from or not
an at was were which can will have has if you your they their these those but all
when there than then also into may would should been only any""".split())


def log(msg):
    print(msg, flush=True)


def die(msg):
    print(f"build_corpus: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def ensure_tokenizers():
    try:
        return importlib.import_module("tokenizers")
    except ImportError:
        req = os.path.join(REPO, "requirements.txt")
        log(f"tokenizers not installed: pip install -r {req}")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", req])
        if r.returncode != 0:
            die("pip install of tokenizers failed (see above)")
        importlib.invalidate_caches()
        return importlib.import_module("tokenizers")


# ------------------------------------------------------------------------------------
# cleaning

_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def unwrap(par):
    """Join the lines of a hard-wrapped paragraph; 'narra-' + 'tive' joins without space."""
    out = ""
    for line in par.split("\n"):
        line = line.strip()
        if not line:
            continue
        if not out:
            out = line
        elif re.search(r"[A-Za-z]-$", out) and line[:1].islower():
            out += line
        else:
            out += " " + line
    return re.sub(r"[ \t]+", " ", out)


def is_german(par):
    """Stop-word vote: keep unless English stop words are at least as frequent."""
    words = re.findall(r"[a-zäöüß]+", par.lower())
    de = sum(w in DE_STOP for w in words)
    en = sum(w in EN_STOP for w in words)
    return de > en or (de == 0 and en == 0)


def clean_paragraphs(text, kind):
    """Raw document -> list of clean paragraphs (for code: the whole file, one item)."""
    text = text.replace(EOT, "<| endoftext |>")  # the EOT string must never occur in text
    text = _CTRL.sub("", text.replace("\t", "    ") if kind != "code" else text.replace("\f", ""))
    if kind == "code":
        lines = [l.rstrip() for l in text.split("\n")]
        body = "\n".join(lines).strip("\n")
        return [body + "\n"] if body else []
    text = unicodedata.normalize("NFC", text)
    pars = []
    for par in re.split(r"\n[ \t]*\n", text):
        if kind == "wrapped":
            par = unwrap(par)
        else:
            par = "\n".join(re.sub(r"[ \t]+", " ", l).strip() for l in par.split("\n") if l.strip())
        if par.strip():
            pars.append(par)
    return pars


class DomainCleaner:
    """Applies the per-domain filters: exact-duplicate removal and the language vote."""

    def __init__(self, domain):
        self.domain = domain
        self.seen = set()
        self.dropped_dup = 0
        self.dropped_lang = 0

    def __call__(self, text, kind):
        pars = clean_paragraphs(text, kind)
        if kind == "code":
            h = hashlib.sha256(pars[0].encode()).digest() if pars else None
            if h is None or h in self.seen:
                self.dropped_dup += bool(pars)
                return ""
            self.seen.add(h)
            return pars[0]
        keep = []
        for p in pars:
            if self.domain == "de" and not is_german(p):
                self.dropped_lang += 1
                continue
            if len(p) >= DEDUP_MIN_CHARS:
                h = hashlib.sha256(p.encode()).digest()
                if h in self.seen:
                    self.dropped_dup += 1
                    continue
                self.seen.add(h)
            keep.append(p)
        doc = "\n\n".join(keep)
        return doc if len(doc) >= MIN_DOC_CHARS else ""


def collect_domain(domain, args):
    """Fetch and clean one domain -> list of (document name, clean text), in fixed order."""
    entries = [s for s in sources.SOURCES[domain] if s[3] or not args.tiny]
    budget = args.cap_bytes // len(entries) if args.cap_bytes else None
    cleaner = DomainCleaner(domain)
    docs, failed = [], []
    for pkg, pattern, extractor, _ in entries:
        t0 = time.time()
        try:
            tree = sources.fetch_package(pkg, args.cache)
        except sources.FetchError as e:
            log(f"  [{domain}] WARNING: skipping {pkg}: {e}")
            failed.append(pkg)
            continue
        files = sources.find_files(tree, pattern)
        if not files:
            log(f"  [{domain}] WARNING: {pkg}: no files match {pattern!r}; skipped")
            failed.append(pkg)
            continue
        n, nbytes = 0, 0
        for name, raw, kind in extractor(tree, files):
            text = cleaner(raw, kind)
            if not text:
                continue
            docs.append((f"{pkg}/{name}", text))
            n += 1
            nbytes += len(text.encode())
            if budget and nbytes >= budget:
                break
        log(f"  [{domain}] {pkg:34s} {len(files):5d} files -> {n:5d} docs {nbytes / 1e6:7.2f} MB"
            f"  ({time.time() - t0:.1f}s)")
    log(f"  [{domain}] dropped {cleaner.dropped_dup} duplicate paragraphs/files, "
        f"{cleaner.dropped_lang} paragraphs not in the domain's language")
    if not docs:
        die(f"domain {domain!r} is empty: every source failed ({', '.join(failed)}); "
            f"check network access to the Debian archive (apt-get download)")
    return docs, failed


# ------------------------------------------------------------------------------------
# split

def chunk_unit(h):
    return int.from_bytes(hashlib.sha256(h.encode()).digest()[:8], "big") / 2.0 ** 64


def split_domain(domain, docs, val_frac, chunk_bytes, min_val_chunks):
    """Cut documents into ~chunk_bytes chunks at paragraph boundaries and assign each
    chunk to train or val by hashing its id. Returns {"train": [...], "val": [...]}
    lists of document texts (runs of consecutive same-split chunks of one document)."""
    chunks = []  # (doc index, text, hash unit)
    for di, (name, text) in enumerate(docs):
        cur, size, k = [], 0, 0
        pars = text.split("\n\n")
        for i, p in enumerate(pars):
            cur.append(p)
            size += len(p.encode()) + 2
            if size >= chunk_bytes or i == len(pars) - 1:
                chunks.append([di, "\n\n".join(cur), chunk_unit(f"{domain}:{name}:{k}")])
                cur, size, k = [], 0, k + 1
    is_val = [u < val_frac for _, _, u in chunks]
    if sum(is_val) < min_val_chunks:  # tiny corpora: take the lowest hashes
        for i in sorted(range(len(chunks)), key=lambda i: chunks[i][2])[:min_val_chunks]:
            is_val[i] = True
    if all(is_val):
        die(f"domain {domain}: every chunk landed in validation ({len(chunks)} chunks)")
    out = {"train": [], "val": []}
    prev = None
    for (di, text, _), v in zip(chunks, is_val):
        split = "val" if v else "train"
        if prev == (di, split):
            out[split][-1] += "\n\n" + text
        else:
            out[split].append(text)
        prev = (di, split)
    return out


# ------------------------------------------------------------------------------------
# tokenizer

def bytes_to_unicode():
    """The byte-level BPE alphabet: printable bytes map to themselves, the other bytes
    to code points from 256 upward, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_tokenizer(tk, splits, vocab_size, sample_bytes):
    """Byte-level BPE on an equal-size sample of every domain's train split."""
    per = min(sum(len(t.encode()) for t in s["train"]) for s in splits.values())
    per = min(per, sample_bytes)
    texts = []
    for domain in sorted(splits):
        train = splits[domain]["train"]
        order = sorted(range(len(train)), key=lambda i: hashlib.sha256(f"{domain}:{i}".encode()).digest())
        got = 0
        for i in order:
            t = train[i]
            b = len(t.encode())
            if got + b > per:
                t = t.encode()[:per - got].decode("utf-8", "ignore")
            texts.append(t)
            got += len(t.encode())
            if got >= per:
                break
    log(f"  training BPE vocab {vocab_size} on {per / 1e6:.2f} MB per domain x {len(splits)} domains")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False, max_token_length=MAX_TOKEN_CHARS,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOT) != EOT_ID:
        die(f"{EOT} got id {tok.token_to_id(EOT)}, expected {EOT_ID}")
    if tok.get_vocab_size() != vocab_size:
        die(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size} (sample too small?)")
    return tok


def token_bytes_table(tok):
    """Raw bytes of every token id (undoing the byte-level character mapping)."""
    inv = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for i in range(tok.get_vocab_size()):
        s = tok.id_to_token(i)
        if i == EOT_ID:
            out.append(EOT.encode())
            continue
        try:
            out.append(bytes(inv[c] for c in s))
        except KeyError:
            die(f"token {i} {s!r} has a character outside the byte-level alphabet")
    return out


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_tokenizer_bin(path, table):
    header = [0] * 256
    header[0], header[1], header[2], header[3] = TOK_MAGIC, TOK_VERSION, len(table), EOT_ID
    parts = [struct.pack("<256I", *header)]
    for i, b in enumerate(table):
        if len(b) > 255:
            die(f"token {i} is {len(b)} bytes long; tokenizer.bin stores at most 255")
        parts.append(bytes([len(b)]) + b)
    write_atomic(path, b"".join(parts))


# ------------------------------------------------------------------------------------
# shards

def write_shards(out, domain, split, tokens, shard_tokens):
    names = []
    for k, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        part = tokens[start:start + shard_tokens]
        header = [0] * 256
        header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, len(part)
        if sys.byteorder != "little":
            part = array("H", part)
            part.byteswap()
        name = f"{domain}_{split}_{k:03d}.bin"
        write_atomic(os.path.join(out, name), struct.pack("<256i", *header) + part.tobytes())
        names.append(name)
    return names


def encode_split(tok, docs):
    tokens = array("H")
    for i in range(0, len(docs), 512):
        for enc in tok.encode_batch(docs[i:i + 512], add_special_tokens=False):
            tokens.append(EOT_ID)
            tokens.extend(enc.ids)
    return tokens


# ------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny build: only the small sources, --cap-kb 300 per domain, vocab 2048, out data/tiny")
    ap.add_argument("--out", help="output directory (default data/full, or data/tiny with --tiny)")
    ap.add_argument("--cache", default=os.path.join(REPO, "data", "cache"),
                    help="download/extract cache, shared by all builds (default data/cache)")
    ap.add_argument("--vocab", type=int, help="BPE vocabulary size incl. <|endoftext|> (default 16384; tiny 2048)")
    ap.add_argument("--cap-kb", type=int, help="cap of clean text per domain in KB (default none; tiny 300)")
    ap.add_argument("--domains", default="en,code,de", help="comma-separated domains (default en,code,de)")
    ap.add_argument("--chunk-kb", type=int, default=16, help="split chunk size in KB (default 16)")
    ap.add_argument("--val-frac", type=float, default=0.02, help="validation share (default 0.02)")
    ap.add_argument("--val-frac-smallest", type=float, default=0.04,
                    help="validation share of the smallest domain (default 0.04)")
    ap.add_argument("--sample-mb", type=float, default=8.0,
                    help="tokenizer training sample per domain, MB (default 8; less if a domain is smaller)")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    args = ap.parse_args()
    if args.tiny:
        args.out = args.out or os.path.join(REPO, "data", "tiny")
        args.vocab = args.vocab or 2048
        args.cap_kb = 300 if args.cap_kb is None else args.cap_kb
    args.out = args.out or os.path.join(REPO, "data", "full")
    args.vocab = args.vocab or 16384
    args.cap_bytes = (args.cap_kb or 0) * 1000
    domains = [d for d in args.domains.split(",") if d]
    for d in domains:
        if d not in sources.SOURCES:
            die(f"unknown domain {d!r}; known: {', '.join(sorted(sources.SOURCES))}")
    if not 257 <= args.vocab <= 65536:
        die(f"--vocab {args.vocab}: must be in 257..65536 (uint16 tokens, 256 bytes + EOT)")
    for tool in ("apt-get", "dpkg-deb", "groff"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            die(f"{tool} not found on PATH (Debian tools needed to fetch/render the sources)")
    tk = ensure_tokenizers()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)

    log(f"== 1-2. fetch and clean ({'tiny' if args.tiny else 'full'} build -> {args.out})")
    docs, failed = {}, []
    for d in domains:
        docs[d], f = collect_domain(d, args)
        failed += f

    log("== 3. split")
    sizes = {d: sum(len(t.encode()) for _, t in docs[d]) for d in domains}
    smallest = min(domains, key=lambda d: (sizes[d], d))
    splits = {}
    for d in domains:
        frac = args.val_frac_smallest if d == smallest else args.val_frac
        splits[d] = split_domain(d, docs[d], frac, args.chunk_kb * 1000, min_val_chunks=2 if args.tiny else 1)
        log(f"  [{d}] {sizes[d] / 1e6:.2f} MB, val share {frac:.0%}: "
            f"{len(splits[d]['train'])} train / {len(splits[d]['val'])} val documents")

    log("== 4. tokenizer")
    t0 = time.time()
    tok = train_tokenizer(tk, splits, args.vocab, int(args.sample_mb * 1e6))
    table = token_bytes_table(tok)
    # remove the outputs of an earlier build first, so no stale shard survives
    for f in sorted(os.listdir(args.out)):
        if re.fullmatch(r"[A-Za-z0-9-]+_(train|val)_\d{3}\.bin|tokenizer\.(json|bin)|summary\.json", f):
            os.remove(os.path.join(args.out, f))
    tmp = os.path.join(args.out, "tokenizer.json.tmp")
    tok.save(tmp)
    os.replace(tmp, os.path.join(args.out, "tokenizer.json"))
    write_tokenizer_bin(os.path.join(args.out, "tokenizer.bin"), table)
    log(f"  vocab {tok.get_vocab_size()}, {EOT} = id {EOT_ID}, longest token {max(map(len, table))} bytes"
        f" ({time.time() - t0:.1f}s)")

    log("== 5. shards")
    summary = {"vocab_size": args.vocab, "eot_id": EOT_ID, "domains": {}, "skipped_packages": sorted(failed)}
    for d in domains:
        summary["domains"][d] = {}
        for split in ("train", "val"):
            t0 = time.time()
            tokens = encode_split(tok, splits[d][split])
            files = write_shards(args.out, d, split, tokens, args.shard_tokens)
            nbytes = sum(len(t.encode()) for t in splits[d][split])
            ndocs = len(splits[d][split])
            summary["domains"][d][split] = {
                "text_bytes": nbytes, "documents": ndocs, "tokens": len(tokens),
                "bytes_per_token": round(nbytes / max(1, len(tokens) - ndocs), 3), "files": files}
            log(f"  [{d}] {split}: {len(tokens)} tokens -> {', '.join(files)} ({time.time() - t0:.1f}s)")
    write_atomic(os.path.join(args.out, "summary.json"), (json.dumps(summary, indent=1) + "\n").encode())

    log("")
    log(f"{'domain':8s} {'split':6s} {'MB text':>9s} {'docs':>7s} {'tokens':>11s} {'bytes/token':>12s}")
    for d in domains:
        for split in ("train", "val"):
            s = summary["domains"][d][split]
            log(f"{d:8s} {split:6s} {s['text_bytes'] / 1e6:9.2f} {s['documents']:7d} {s['tokens']:11d} "
                f"{s['bytes_per_token']:12.3f}")
    if failed:
        log(f"skipped packages (download/extract failed): {', '.join(sorted(failed))}")
    log(f"done in {time.time() - t_start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
