#!/usr/bin/env python3
"""Add one small domain to an existing corpus WITHOUT changing it: the new domain's text is
tokenized with the corpus's own tokenizer (tokenizer.json), and the output folder holds the
new domain's shards plus symbolic links to every file of the base folder (its shards,
tokenizer.json, tokenizer.bin, summary.json), so the base shards are shared byte for byte.

    python3 dev/data/build_extra_domain.py                      # data/tiny + go -> data/tiny4
    python3 dev/data/build_extra_domain.py --help

The default extra domain is `go`: the Go source files of golang-github-pierrec-lz4-dev, a
Debian package the tiny build already fetches (its Gutenberg test texts are part of `en`), so
nothing new is downloaded. Steps: the files matching --pattern, the code filter of
sources.python_files (it is language-neutral: size, UTF-8, generated files, line length,
alphanumeric share), exact-duplicate removal (build_corpus.DomainCleaner, code rules), the
train/val split of build_corpus.split_domain (chunks of --chunk-kb at blank lines; val by
sha256 of "domain:document:chunk", at least 2 val chunks), then <|endoftext|> + tokens per
document (build_corpus.encode_split) into <domain>_{train,val}_000.bin. Deterministic.

Used by scripts/repro_nexus.py (the fourth domain of the Nexus table, docs/METHODS.md 2.14).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_corpus as bc  # noqa: E402
import sources  # noqa: E402

REPO = bc.REPO


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=os.path.join(REPO, "data", "tiny"), help="existing corpus folder (default data/tiny)")
    ap.add_argument("--out", default=os.path.join(REPO, "data", "tiny4"), help="output folder (default data/tiny4)")
    ap.add_argument("--domain", default="go", help="name of the new domain (default go)")
    ap.add_argument("--package", default="golang-github-pierrec-lz4-dev", help="Debian package of its text")
    ap.add_argument("--pattern", default=r"gocode/src/.*\.go$", help="regex of the files to take (relative paths)")
    ap.add_argument("--cache", default=os.path.join(REPO, "data", "cache"), help="package cache (default data/cache)")
    ap.add_argument("--chunk-kb", type=float, default=4, help="split chunk size in KB (default 4)")
    ap.add_argument("--val-frac", type=float, default=0.08, help="validation share (default 0.08, at least 2 chunks)")
    args = ap.parse_args()

    tk = bc.ensure_tokenizers()
    tok_path = os.path.join(args.base, "tokenizer.json")
    if not os.path.exists(tok_path):
        bc.die(f"{tok_path}: no tokenizer in the base corpus (make data-tiny first)")
    if os.path.exists(os.path.join(args.base, f"{args.domain}_train_000.bin")):
        bc.die(f"{args.base} already has a domain {args.domain!r}")
    tok = tk.Tokenizer.from_file(tok_path)
    tree = sources.fetch_package(args.package, args.cache)
    files = sources.find_files(tree, args.pattern)
    if not files:
        bc.die(f"{args.package}: no file matches {args.pattern!r}")
    cleaner = bc.DomainCleaner("code")
    docs = []
    for rel, raw, kind in sources.python_files(tree, files):
        text = cleaner(raw, kind)
        if text:
            docs.append((f"{args.package}/{rel}", text))
    if not docs:
        bc.die(f"{args.package}: every file was filtered out")
    splits = bc.split_domain(args.domain, docs, args.val_frac, int(args.chunk_kb * 1000), min_val_chunks=2)

    os.makedirs(args.out, exist_ok=True)
    for f in sorted(os.listdir(args.base)):  # the base corpus, shared through links
        dst = os.path.join(args.out, f)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.relpath(os.path.join(args.base, f), args.out), dst)
    stats = {}
    for split in ("train", "val"):
        tokens = bc.encode_split(tok, splits[split])
        names = bc.write_shards(args.out, args.domain, split, tokens, 100_000_000)
        nbytes = sum(len(t.encode()) for t in splits[split])
        stats[split] = dict(text_bytes=nbytes, documents=len(splits[split]), tokens=len(tokens),
                            bytes_per_token=round(nbytes / max(len(tokens), 1), 3), files=names)
    info = dict(base=os.path.relpath(args.base, REPO), domain=args.domain, package=args.package,
                pattern=args.pattern, files=len(files), documents=len(docs), tokenizer="the base's tokenizer.json",
                splits=stats)
    bc.write_atomic(os.path.join(args.out, f"extra_{args.domain}.json"), (json.dumps(info, indent=1) + "\n").encode())
    bc.log(f"{args.domain}: {len(docs)} documents from {args.package}; train {stats['train']['tokens']} tokens, "
           f"val {stats['val']['tokens']} tokens ({stats['train']['bytes_per_token']} bytes/token) -> {args.out}")


if __name__ == "__main__":
    main()
