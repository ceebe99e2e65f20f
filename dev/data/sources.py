"""Where the corpus text comes from: Debian packages, fetched and unpacked into a cache.

This module is imported by build_corpus.py; it is not a script. It knows

  * how to fetch a package: `apt-get download PKG` into <cache>/debs/ (running
    `apt-get update` once if the download fails), then `dpkg-deb -x` into
    <cache>/tree/PKG/ (extracted into a temp dir and renamed, so an interrupted
    extraction is never mistaken for a complete one);
  * which files of which package hold which domain's text (the SOURCES table);
  * how to turn each kind of file into raw documents: Project Gutenberg books
    (one document per chapter), fortune files, the Devil's Dictionary, HTML /
    Mallard help pages, man pages rendered with groff, Python source files.

Every extractor yields (document_name, raw_text, kind) in a fixed, sorted order.
`kind` tells the cleaner what to do: "wrapped" (hard-wrapped prose: unwrap lines
inside a paragraph), "lines" (keep line breaks: verse, fortunes, man pages, HTML
blocks) or "code" (keep the file as it is).
"""

import concurrent.futures
import glob
import gzip
import html.parser
import os
import re
import shutil
import subprocess
import sys


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked."""


_APT_UPDATED = False


def log(msg):
    print(msg, flush=True)


def fetch_package(pkg, cache):
    """Return the directory the package is unpacked in, downloading it if needed."""
    global _APT_UPDATED
    tree = os.path.join(cache, "tree", pkg)
    if os.path.isdir(tree):
        return tree
    debdir = os.path.join(cache, "debs")
    os.makedirs(debdir, exist_ok=True)
    debs = sorted(glob.glob(os.path.join(debdir, pkg + "_*.deb")))
    if not debs:
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", pkg], cwd=debdir,
                               capture_output=True, text=True)
            debs = sorted(glob.glob(os.path.join(debdir, pkg + "_*.deb")))
            if r.returncode == 0 and debs:
                break
            if attempt == 0 and not _APT_UPDATED:
                log(f"  apt-get download {pkg} failed; running apt-get update and retrying")
                subprocess.run(["apt-get", "update"], capture_output=True, text=True)
                _APT_UPDATED = True
            else:
                raise FetchError(f"apt-get download {pkg} failed: {r.stderr.strip()[-300:]}")
    if len(debs) > 1:
        raise FetchError(f"several .deb files for {pkg} in {debdir}: {debs}; remove the stale ones")
    tmp = tree + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    r = subprocess.run(["dpkg-deb", "-x", debs[0], tmp], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"dpkg-deb -x {debs[0]} failed: {r.stderr.strip()[-300:]}")
    os.rename(tmp, tree)
    return tree


def deb_version(pkg, cache):
    debs = sorted(glob.glob(os.path.join(cache, "debs", pkg + "_*.deb")))
    return os.path.basename(debs[0])[len(pkg) + 1:-len("_all.deb")].rsplit("_", 1)[0] if debs else "?"


def find_files(root, pattern):
    """Sorted list of files under root whose path relative to root matches regex pattern."""
    rx = re.compile(pattern)
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if rx.search(rel) and os.path.isfile(p) and not os.path.islink(p):
                out.append(rel)
    return sorted(out)


def read_text(path, fallback_latin1=True):
    """Read a (possibly gzipped) text file; UTF-8 (BOM stripped), else Latin-1 or None."""
    opener = gzip.open if path.endswith((".gz", ".dz")) else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if not fallback_latin1:
            return None
        text = data.decode("latin-1")
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------------
# Project Gutenberg books

_PG_START = re.compile(r"^\s*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.I)
_PG_END = re.compile(r"^\s*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the |this )?Project Gutenberg"
                     r"|\*\*\*START\*\*THE SMALL PRINT)", re.I)
_CHAPTER = re.compile(r"^(CHAPTER|Chapter|ADVENTURE|BOOK|PART)\s+([0-9]+|[IVXLC]+)\b")


def strip_gutenberg(text):
    """Keep only the body text between Gutenberg start and end markers (several volumes
    may be concatenated in one file). A file without a start marker is kept whole,
    cut at the first end marker."""
    lines = text.split("\n")
    has_start = any(_PG_START.match(l) for l in lines)
    body, inside = [], not has_start
    for line in lines:
        if _PG_START.match(line):
            inside = True
            continue
        if _PG_END.match(line):
            inside = False
            continue
        if inside and not re.match(r"^\s*(Produced by|This etext was|\*{3,}\s*$)", line):
            body.append(line)
    return "\n".join(body)


def split_chapters(text, max_chars=60000):
    """Split a book into chapters at CHAPTER/ADVENTURE/... heading lines; pieces longer
    than max_chars (books without such headings) are cut at blank lines."""
    pieces, cur = [], []
    for line in text.split("\n"):
        if _CHAPTER.match(line) and any(l.strip() for l in cur):
            pieces.append("\n".join(cur))
            cur = []
        cur.append(line)
    pieces.append("\n".join(cur))
    out = []
    for p in pieces:
        while len(p) > max_chars:
            cut = p.rfind("\n\n", 0, max_chars)
            if cut <= 0:
                cut = max_chars
            out.append(p[:cut])
            p = p[cut:]
        out.append(p)
    return [p for p in out if p.strip()]


def gutenberg_books(tree, files):
    for rel in files:
        text = strip_gutenberg(read_text(os.path.join(tree, rel)))
        name = os.path.basename(rel)
        for i, ch in enumerate(split_chapters(text)):
            yield f"{name}#ch{i:03d}", ch, "wrapped"


# ----------------------------------------------------------------------------------
# Fortunes, the Devil's Dictionary, the Jargon File

def fortune_files(tree, files):
    """One document per fortune file; each fortune is a paragraph (line breaks kept)."""
    for rel in files:
        if "ascii" in os.path.basename(rel):
            continue  # pictures, not text
        text = read_text(os.path.join(tree, rel))
        parts = [p.strip("\n") for p in re.split(r"^%\s*$", text, flags=re.M)]
        # blank lines inside a fortune would split it into paragraphs: squeeze them
        parts = [re.sub(r"\n\s*\n", "\n", p) for p in parts if p.strip()]
        yield rel, "\n\n".join(parts), "lines"


def dict_file(tree, files):
    """A dictd database (.dict.dz = gzip): drop the 00-database-* entries; one document."""
    for rel in files:
        text = read_text(os.path.join(tree, rel))
        entries = re.split(r"\n(?=\S)", text)  # a headword starts at column 0
        keep = [e for e in entries if not e.startswith("00-database") and not e.startswith("00database")]
        body = "\n".join(keep)
        for i, piece in enumerate(split_chapters(body, max_chars=40000)):
            yield f"{rel}#{i:03d}", piece, "wrapped"


def jargon_file(tree, files):
    for rel in files:
        text = read_text(os.path.join(tree, rel))
        for i, piece in enumerate(split_chapters(text, max_chars=40000)):
            yield f"{rel}#{i:03d}", piece, "wrapped"


# ----------------------------------------------------------------------------------
# HTML and Mallard help pages

_BLOCK = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd",
          "table", "tr", "td", "th", "section", "article", "blockquote", "title", "pre",
          "item", "list", "terms", "steps", "note", "figure", "caption", "screen", "listing",
          "page", "tree", "desc", "synopsis", "example", "hr"}
_PRE = {"pre", "screen", "programlisting", "code-block"}
_SKIP = {"script", "style", "head", "header", "nav", "footer", "info", "noscript", "svg", "button"}
_SKIP_CLASS = re.compile(r"\b(navheader|navfooter|toc|breadcrumbs?|dropdowns?|footer|header)\b")
_VOID = {"br", "img", "meta", "link", "hr", "input", "base", "area", "col", "embed", "source", "wbr"}


class _HTMLText(html.parser.HTMLParser):
    """Collect the visible text of an HTML/XML page as paragraphs (blocks)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks, self.cur = [], []
        self.skip_depth = 0   # >0 while inside a skipped element
        self.pre_depth = 0
        self.stack = []

    def flush(self):
        text = "".join(self.cur)
        self.cur = []
        if self.pre_depth:
            text = text.strip("\n")
        else:
            text = re.sub(r"\s+", " ", text).strip()
        if text.strip():
            self.blocks.append(text)

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag in _BLOCK and not self.skip_depth:
                self.flush()
            return
        cls = dict(attrs).get("class") or ""
        skip = tag in _SKIP or bool(_SKIP_CLASS.search(cls))
        self.stack.append((tag, skip))
        if skip:
            self.skip_depth += 1
        if tag in _BLOCK and not self.skip_depth:
            self.flush()
        if tag in _PRE:
            self.pre_depth += 1

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        # pop to the matching open tag (tolerates unclosed inner tags)
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skip = self.stack.pop()
            if t in _BLOCK and not self.skip_depth:
                self.flush()
            if t in _PRE:
                self.pre_depth -= 1
            if skip:
                self.skip_depth -= 1
            if t == tag:
                break

    def handle_data(self, data):
        if not self.skip_depth:
            self.cur.append(data)


def html_to_text(markup):
    p = _HTMLText()
    p.feed(markup)
    p.close()
    p.flush()
    return "\n\n".join(p.blocks)


def html_pages(tree, files):
    for rel in files:
        text = read_text(os.path.join(tree, rel))
        yield rel, html_to_text(text), "lines"


# ----------------------------------------------------------------------------------
# Man pages rendered with groff

def _render_man(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        src = f.read()
    if src.startswith(b".so "):
        return ""  # a link to another page
    r = subprocess.run(["groff", "-man", "-Tutf8", "-Kutf8", "-P-cbou", "-rLL=4000n", "-rcR=1"],
                       input=src, capture_output=True, env=dict(os.environ, LC_ALL="C.UTF-8"))
    if r.returncode != 0:
        return ""
    lines = r.stdout.decode("utf-8", "replace").split("\n")
    # drop the running header and footer lines (page name padded with many spaces)
    lines = [l for l in lines if not re.search(r"\S {20,}\S", l)]
    return "\n".join(l.strip() for l in lines)


def man_pages(tree, files):
    """One document per man page. Rendering runs on all cores; order stays sorted."""
    batch = 4 * (os.cpu_count() or 2)  # small batches: a capped (tiny) build renders few
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        for i in range(0, len(files), batch):
            rels = files[i:i + batch]
            for rel, text in zip(rels, ex.map(_render_man, [os.path.join(tree, r) for r in rels])):
                if text.strip():
                    yield rel, text, "lines"


# ----------------------------------------------------------------------------------
# Python source files

_GENERATED = re.compile(r"(/rubi/|/_parsetab|/parsetab|lextab|_pb2\.py$|/unicodedata|_db\.py$"
                        r"|/encodings/|/idlelib/idle_test/|/data/|/testdata/|/locale/|/migrations/"
                        r"|/_mappings|/benchmarks?/|/__phello__|/pydoc_data/|/test/tokenizedata/)")


def python_files(tree, files, max_bytes=200_000):
    """Code filter: skip big files, non-UTF-8, generated/data paths, very long lines,
    low share of alphanumeric characters, files that say they are generated."""
    for rel in files:
        path = os.path.join(tree, rel)
        if _GENERATED.search("/" + rel) or os.path.getsize(path) > max_bytes:
            continue
        text = read_text(path, fallback_latin1=False)
        if text is None or not text.strip():
            continue
        lines = text.split("\n")
        if max(len(l) for l in lines) > 1000:
            continue
        head = text[:2000].lower()
        if "generated by" in head or "do not edit" in head or "autogenerated" in head or "auto-generated" in head:
            continue
        alnum = sum(c.isalnum() for c in text)
        if alnum < 0.25 * len(text):
            continue
        yield rel, text, "code"


# ----------------------------------------------------------------------------------
# The table of sources: domain -> list of (package, file regex, extractor, in_tiny)

PY = r"\.py$"
SOURCES = {
    "en": [
        ("liblingua-stem-perl", r"examples/(collected_works_poe|huckfinn)\.txt$", gutenberg_books, True),
        ("golang-github-pierrec-lz4-dev", r"testdata/(Mark\.Twain-Tom\.Sawyer|pg1661)\.txt$", gutenberg_books, True),
        ("golang-github-colinmarc-hdfs-dev", r"testdata/mobydick\.txt$", gutenberg_books, False),
        ("jargon-text", r"jargon\.txt\.gz$", jargon_file, True),
        ("dict-devil", r"devil\.dict\.dz$", dict_file, False),
        ("fortunes", r"games/fortunes/[a-z-]+$", fortune_files, False),
        ("fortunes-min", r"games/fortunes/[a-z-]+$", fortune_files, False),
        ("cfi-en", r"html/.*\.html?$", html_pages, False),
    ],
    "code": [
        ("libpython3.11-minimal", r"usr/lib/python3\.11/.*" + PY, python_files, True),
        ("libpython3.11-stdlib", r"usr/lib/python3\.11/.*" + PY, python_files, True),
        ("libpython3.11-testsuite", r"usr/lib/python3\.11/test/.*" + PY, python_files, False),
        ("python3-sympy", r"dist-packages/sympy/.*" + PY, python_files, False),
        ("python3-django", r"dist-packages/django/.*" + PY, python_files, False),
    ],
    "de": [
        ("manpages-de", r"man/de/man[0-9]/.*\.gz$", man_pages, True),
        ("manpages-de-dev", r"man/de/man[0-9]/.*\.gz$", man_pages, False),
        ("fortunes-de", r"games/fortunes/de/[a-z-]+$", fortune_files, True),
        ("libreoffice-help-de", r"help/de/text/.*\.html$", html_pages, False),
        ("debian-handbook", r"html/de-DE/.*\.html$", html_pages, False),
        ("debian-reference-de", r"\.de\.html$", html_pages, False),
        ("developers-reference-de", r"developers-reference/de/.*\.html$", html_pages, False),
        ("debian-faq-de", r"/de/.*\.html$", html_pages, False),
        ("maint-guide-de", r"\.de\.html$", html_pages, False),
        ("installation-guide-amd64", r"/de/.*\.html$", html_pages, False),
        ("gnome-user-docs", r"help/de/.*\.page$", html_pages, False),
        ("debian-history", r"\.de\.html$", html_pages, False),
    ],
}

LICENSES = {
    "liblingua-stem-perl": "public domain (Gutenberg texts)",
}
