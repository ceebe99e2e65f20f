#!/usr/bin/env python3
"""test_tokenizer.py [TOKENIZER_DIR]: common/bpe.h (through test/bin/test_bpe) must encode
exactly as Hugging Face `tokenizers` does with the corpus tokenizer (data/tiny by default):
hand-picked strings (contractions, whitespace runs, digits, punctuation, German, code, the
end-of-text token, non-ASCII) and every validation shard of the corpus decoded back to text,
cut into pieces. Prints "N passed, M failed"."""
import json, os, struct, subprocess, sys, tempfile

def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "data/tiny"
    path = os.path.join(d, "tokenizer.json")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    texts = [
        "Hello world", "  two spaces", "tab\there", "new\n\nlines\n", "trailing   ", " ", "", "a",
        "don't we'll they've I'm it's she'd you're", "'s 't 'x '' ''s", "12345 6.02e23 x2 3rd",
        "Größe über Straße, naïve café — déjà vu", "¹²³ ½ ¼ ¾ µ ª º", "def f(x):\n    return x**2  # sq\n",
        "if (a != b) { c[i] += 1; }\r\n", "<|endoftext|>start", "mid<|endoftext|>dle", "end<|endoftext|>",
        "日本語のテキスト and emoji 🙂👍", "\u00a0nbsp\u2003em space", "!!!???...", " ' ' '",
    ]
    n_hand = len(texts)
    # the corpus: every val shard decoded and cut into pieces of 2000 characters
    for f in sorted(os.listdir(d)):
        if "_val_" in f and f.endswith(".bin"):
            raw = open(os.path.join(d, f), "rb").read()
            n = struct.unpack("<256i", raw[:1024])[2]
            ids = struct.unpack("<%dH" % n, raw[1024:1024 + 2 * n])
            text = tok.decode(list(ids), skip_special_tokens=False)
            texts += [text[i:i + 2000] for i in range(0, min(len(text), 200000), 2000)]
    with tempfile.TemporaryDirectory() as tmp:
        tf = os.path.join(tmp, "texts.jsonl")
        with open(tf, "w") as f:
            for t in texts:
                f.write(json.dumps(t) + "\n")
        exe = os.environ.get("TEST_BPE", "test/bin/test_bpe")
        res = subprocess.run([exe, path, tf], capture_output=True, text=True)
        if res.returncode != 0:
            print("FAIL test_bpe exited", res.returncode, res.stderr.strip())
            print("0 passed, 1 failed"); return 1
        got = [json.loads(l) for l in res.stdout.splitlines()]
    passed = failed = 0
    for t, g in zip(texts, got):
        want = tok.encode(t, add_special_tokens=False).ids
        if g == want:
            passed += 1
        else:
            failed += 1
            if failed <= 5:
                k = next((i for i, (a, b) in enumerate(zip(g, want)) if a != b), min(len(g), len(want)))
                print("FAIL %r...: first difference at token %d: ours %s, tokenizers %s" % (
                    t[:40], k, [tok.id_to_token(x) for x in g[k:k + 4]], [tok.id_to_token(x) for x in want[k:k + 4]]))
    if len(got) != len(texts):
        failed += 1; print("FAIL test_bpe printed %d lines for %d texts" % (len(got), len(texts)))
    chars = sum(len(t) for t in texts)
    print("%d strings (%d characters, %d hand-picked, the rest from the val shards) encoded as tokenizers does"
          % (passed, chars, n_hand))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0

sys.exit(main())
