#!/usr/bin/env python3
"""Check a built corpus directory (data/tiny or data/full).

    python3 dev/data/test_data.py data/tiny
    python3 dev/data/test_data.py data/full --no-rebuild
    python3 dev/data/test_data.py --help

Checks, each printing PASS/FAIL with a reason:
  * tokenizer.bin: header (magic 20240328, version 2, vocab, EOT id), every token's bytes
    equal tokenizers' own decode of that id (compared after lossy UTF-8 decoding, as
    tokenizers decodes partial UTF-8 sequences to U+FFFD), and concatenated table bytes
    of encoded text give back the text's exact bytes;
  * every shard: header magic 20240520, version 1, token count matching the file size,
    tokens < vocab size; a shard starts with <|endoftext|>;
  * EOT placement: number of EOT tokens = number of documents in summary.json, no
    document contains EOT, no empty document;
  * encode/decode round trip with tokenizer.json on a sample of validation documents;
  * no text in both splits: no document, and (outside code) no paragraph of >= 40
    characters, occurs in both train and val;
  * negative self-check: a corrupted copy of a shard must fail the header check;
  * determinism (tiny only, unless --no-rebuild): rebuild the tiny corpus from the cache
    into a temp dir and compare sha256 of every output file.
Ends with the line "N passed, M failed"; exit status 1 if M > 0.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
SHARD_MAGIC, TOK_MAGIC = 20240520, 20240328
EOT = "<|endoftext|>"

results = []


def check(name, ok, reason=""):
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {reason}" if reason else ""), flush=True)
    return ok


def read_shard(path):
    """Return the shard's tokens; raise ValueError saying what is wrong with the file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 1024:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than the 1024-byte header")
    h = struct.unpack("<256i", data[:1024])
    if h[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: magic {h[0]}, expected {SHARD_MAGIC}")
    if h[1] != 1:
        raise ValueError(f"{path}: version {h[1]}, expected 1")
    if len(data) != 1024 + 2 * h[2]:
        raise ValueError(f"{path}: header says {h[2]} tokens = {1024 + 2 * h[2]} bytes, file has {len(data)}")
    tokens = array("H")
    tokens.frombytes(data[1024:])
    if sys.byteorder != "little":
        tokens.byteswap()
    return tokens


def read_tokenizer_bin(path):
    with open(path, "rb") as f:
        data = f.read()
    h = struct.unpack("<256I", data[:1024])
    table, pos = [], 1024
    for _ in range(h[2]):
        n = data[pos]
        table.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} bytes left after {h[2]} tokens")
    return h, table


def split_docs(tokens, eot):
    """Token list -> list of documents (token lists); every document follows an EOT."""
    docs, cur = [], None
    for t in tokens:
        if t == eot:
            if cur is not None:
                docs.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur is not None:
        docs.append(cur)
    return docs


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="corpus directory, e.g. data/tiny")
    ap.add_argument("--no-rebuild", action="store_true", help="skip the determinism rebuild")
    ap.add_argument("--sample-docs", type=int, default=200, help="validation documents per domain to round-trip")
    args = ap.parse_args()
    d = args.dir
    try:
        import tokenizers
    except ImportError:
        sys.exit("test_data: tokenizers is not installed (python3 -m pip install -r requirements.txt)")
    for f in ("tokenizer.json", "tokenizer.bin", "summary.json"):
        if not os.path.exists(os.path.join(d, f)):
            sys.exit(f"test_data: {os.path.join(d, f)} missing; build the corpus first (make data-tiny)")
    tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    summary = json.load(open(os.path.join(d, "summary.json")))
    vocab = tok.get_vocab_size()

    # --- tokenizer.bin
    h, table = read_tokenizer_bin(os.path.join(d, "tokenizer.bin"))
    eot = h[3]
    check("tokenizer.bin header", h[0] == TOK_MAGIC and h[1] == 2 and h[2] == vocab and
          tok.id_to_token(eot) == EOT and not any(h[4:]),
          f"magic {h[0]} version {h[1]} vocab {h[2]} (json {vocab}) eot {eot} = {tok.id_to_token(eot)!r}")
    bad = [i for i in range(vocab)
           if table[i].decode("utf-8", "replace") != tok.decode([i], skip_special_tokens=False)]
    check("tokenizer.bin bytes == tokenizers decode, every id", not bad,
          f"{len(bad)} ids differ, first {bad[:5]}" if bad else f"{vocab} ids")

    # --- shards
    shards = sorted(glob.glob(os.path.join(d, "*_train_*.bin")) + glob.glob(os.path.join(d, "*_val_*.bin")))
    domains = sorted({re.sub(r"_(train|val)_\d+\.bin$", "", os.path.basename(p)) for p in shards})
    check("shards found for every domain and split",
          shards and all(glob.glob(os.path.join(d, f"{dom}_{s}_000.bin")) for dom in domains for s in ("train", "val"))
          and domains == sorted(summary["domains"]),
          f"domains {domains}, summary {sorted(summary['domains'])}")
    docs = {}
    for dom in domains:
        for split in ("train", "val"):
            toks, errors = array("H"), []
            for p in sorted(glob.glob(os.path.join(d, f"{dom}_{split}_*.bin"))):
                try:
                    t = read_shard(p)
                except ValueError as e:
                    errors.append(str(e))
                    continue
                if not t or t[0] != eot:
                    errors.append(f"{p}: does not start with EOT (first token {t[0] if t else None})")
                if t and max(t) >= vocab:
                    errors.append(f"{p}: token {max(t)} >= vocab {vocab}")
                toks.extend(t)
            check(f"{dom}/{split} shard headers, start with EOT, tokens < vocab", not errors, "; ".join(errors)
                  or f"{len(toks)} tokens")
            ds = split_docs(toks, eot)
            docs[dom, split] = ds
            want = summary["domains"][dom][split]["documents"]
            n_eot = sum(1 for x in toks if x == eot)
            check(f"{dom}/{split} EOT count = documents, no empty document",
                  n_eot == want == len(ds) and all(ds), f"{n_eot} EOT, {want} documents in summary.json")

    # --- round trip and C-table decode on validation documents
    for dom in domains:
        sample = docs[dom, "val"][:args.sample_docs]
        bad_rt, bad_tab = 0, 0
        for ids in sample:
            text = tok.decode(ids, skip_special_tokens=False)
            if tok.encode(text, add_special_tokens=False).ids != list(ids):
                bad_rt += 1
            if b"".join(table[i] for i in ids) != text.encode("utf-8"):
                bad_tab += 1
            if EOT in text:
                bad_rt += 1
        check(f"{dom} val round trip encode(decode(doc)) == doc", sample and not bad_rt,
              f"{bad_rt} of {len(sample)} documents differ")
        check(f"{dom} val tokenizer.bin bytes == decoded text bytes", sample and not bad_tab,
              f"{bad_tab} of {len(sample)} documents differ")

    # --- no text in both splits
    for dom in domains:
        texts = {s: [tok.decode(ids, skip_special_tokens=False) for ids in docs[dom, s]] for s in ("train", "val")}
        dh = {s: {hashlib.sha256(t.encode()).digest() for t in texts[s]} for s in texts}
        both_docs = len(dh["train"] & dh["val"])
        both_pars = 0
        if dom != "code":
            ph = {s: {hashlib.sha256(p.encode()).digest() for t in texts[s] for p in t.split("\n\n") if len(p) >= 40}
                  for s in texts}
            both_pars = len(ph["train"] & ph["val"])
        check(f"{dom} no document{'' if dom == 'code' else ' or paragraph'} in both splits",
              both_docs == 0 and both_pars == 0, f"{both_docs} documents, {both_pars} paragraphs shared")

    # --- negative self-check: corrupt a copy, the header check must fail
    with tempfile.TemporaryDirectory() as tmp:
        src = shards[0]
        caught = []
        for what, patch in (("magic", lambda b: b"\0\0\0\0" + b[4:]),
                            ("count", lambda b: b[:8] + struct.pack("<i", struct.unpack("<i", b[8:12])[0] + 1) + b[12:]),
                            ("truncated", lambda b: b[:-2])):
            p = os.path.join(tmp, f"bad_{what}.bin")
            with open(src, "rb") as f:
                data = patch(f.read())
            with open(p, "wb") as f:
                f.write(data)
            try:
                read_shard(p)
            except ValueError:
                caught.append(what)
        check("negative self-check: corrupted shard copies are rejected", len(caught) == 3, f"caught {caught}")

    # --- determinism: rebuild tiny into a temp dir and compare
    is_tiny = summary["vocab_size"] == 2048 and os.path.basename(os.path.normpath(d)) == "tiny"
    if is_tiny and not args.no_rebuild:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "tiny")
            cmd = [sys.executable, os.path.join(HERE, "build_corpus.py"), "--tiny", "--out", out]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if not check("tiny rebuild runs", r.returncode == 0, r.stderr.strip()[-500:]):
                pass
            else:
                names = sorted(f for f in os.listdir(d) if not f.endswith(".tmp"))
                names2 = sorted(os.listdir(out))
                diff = [f for f in names if f not in names2 or sha256_file(os.path.join(d, f)) != sha256_file(os.path.join(out, f))]
                check("tiny rebuild is byte-identical (sha256 of every file)", not diff and names == names2,
                      f"differ: {diff}, files {names} vs {names2}" if diff or names != names2 else f"{len(names)} files")
    else:
        print("skip  determinism rebuild (only for data/tiny; or --no-rebuild given)")

    n_fail = results.count(False)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
