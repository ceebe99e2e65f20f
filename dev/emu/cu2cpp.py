#!/usr/bin/env python3
"""cu2cpp.py: rewrite the CUDA syntax that g++ cannot parse, for the CUDA emulation.

The emulation (dev/emu/cuda_emu.h, docs/emulation.md) compiles the project's .cu/.cuh files
with g++. Three constructs need a textual rewrite first; everything else is ordinary C++
once cuda_emu.h is force-included:

  NAME<targs><<<g, b[, smem[, stream]]>>>(args)
      -> ::emu::launch("file:line", KADDR, [&](auto&&... a) { NAME<targs>(a...); }, g, b[, smem[, stream]])(args)
     KADDR is the kernel's address where C++ can take it (a non-template kernel, or explicit
     template arguments), else nullptr; it keys the per-kernel shared-memory opt-in.
  extern __shared__ [align] TYPE NAME[];
      -> TYPE* NAME = reinterpret_cast<TYPE*>(::emu::dynamic_smem());
  __shared__ TYPE NAME[dims];
      -> the same, followed by ::emu::static_smem(&NAME, sizeof(NAME), "file:line");
         (poisons it for each block and counts it against the shared-memory limit)

Line numbers are kept (no line is added or removed) and each output file starts with a
#line directive naming the source file, so compiler errors and the emulator's reports point
at the original file and line. Comments and string literals are left alone.

Usage: cu2cpp.py SRC_ROOT DST_ROOT [DIR ...]   mirror the .cu .cuh .h .cpp files under the
                                                given DIRs of SRC_ROOT (default: all), rewritten;
                                                unchanged outputs keep their timestamps
       cu2cpp.py FILE                           print FILE rewritten
"""
import os
import re
import sys

SOURCE_EXT = (".cu", ".cuh", ".h", ".hpp", ".cpp", ".c")
SKIP_DIRS = {"build", "data", "runs", "out", "__pycache__"}

TEMPLATE_KERNEL = re.compile(r"template\s*<[^;{}]*?>\s*__global__\b[^;{}(]*?\b(\w+)\s*\(", re.S)
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*|alignas\s*\(\s*\d+\s*\)\s*)?"
    r"([A-Za-z_][\w:<>, ]*?)\s*(?:__align__\s*\(\s*\d+\s*\)\s*)?(\w+)\s*\[\s*\]\s*;")
# __shared__ TYPE NAME[dims] (, NAME[dims])* ;   (group 2: the declarators)
STATIC_SHARED = re.compile(r"(?<![\w#])__shared__[ \t]+([A-Za-z_][\w:<>]*(?:[ \t]+[A-Za-z_][\w:<>]*)*?)[ \t]+"
                           r"(\w+[ \t]*(?:\[[^\];{}\n]*\][ \t]*)*(?:,[ \t]*\w+[ \t]*(?:\[[^\];{}\n]*\][ \t]*)*)*);")
DECLARATOR_NAME = re.compile(r"(\w+)[ \t]*(?:\[[^\]]*\][ \t]*)*$")


def code_mask(s):
    """True for each character of s that is code (not inside a comment or a literal)."""
    mask = [True] * len(s)
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if s.startswith("//", i):
            j = s.find("\n", i)
            j = n if j < 0 else j
        elif s.startswith("/*", i):
            j = s.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            if c == "'" and i > 0 and (s[i - 1].isalnum()):  # digit separator 1'000
                i += 1
                continue
            j = i + 1
            while j < n and s[j] != c:
                j += 2 if s[j] == "\\" else 1
            j = min(j + 1, n)
        else:
            i += 1
            continue
        for k in range(i, j):
            mask[k] = False
        i = j
    return mask


def line_of(s, pos):
    return s.count("\n", 0, pos) + 1


def rewrite_launches(s, path, template_kernels):
    mask = code_mask(s)
    out, i = [], 0
    while True:
        j = s.find("<<<", i)
        while j >= 0 and not mask[j]:
            j = s.find("<<<", j + 3)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        k = s.find(">>>", j)
        if k < 0:
            raise SystemExit("%s:%d: unterminated <<<" % (path, line_of(s, j)))
        cfg = s[j + 3:k]
        # the kernel expression before <<<: [ns::]name[<template args>]
        e = j
        while e > 0 and s[e - 1].isspace():
            e -= 1
        explicit_targs = s[e - 1] == ">"
        if explicit_targs:  # find the matching '<'
            depth, e2 = 0, e - 1
            while e2 >= 0:
                if s[e2] == ">":
                    depth += 1
                elif s[e2] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                e2 -= 1
            e = e2
        b = e
        while b > 0 and (s[b - 1].isalnum() or s[b - 1] in "_:"):
            b -= 1
        kernel = s[b:j].strip()
        name = s[b:e].split("::")[-1]
        if not name:
            raise SystemExit("%s:%d: no kernel name before <<<" % (path, line_of(s, j)))
        kaddr = "(const void*)&%s" % kernel if explicit_targs or name not in template_kernels else "nullptr"
        site = "%s:%d" % (path, line_of(s, j))
        out.append(s[i:b])
        out.append('::emu::launch("%s", %s, [&](auto&&... emu_a_) { %s(emu_a_...); }, %s)' % (site, kaddr, kernel, cfg))
        i = k + 3


def rewrite_shared(s, path):
    def extern_sub(m):
        t = m.group(1).strip()
        return "%s* %s = reinterpret_cast<%s*>(::emu::dynamic_smem());" % (t, m.group(2), t)

    s = EXTERN_SHARED.sub(extern_sub, s)
    mask = code_mask(s)
    out, last = [], 0
    for m in STATIC_SHARED.finditer(s):
        if not mask[m.start()] or "extern" in s[max(0, m.start() - 8):m.start()]:
            continue
        out.append(s[last:m.end()])
        for decl in m.group(2).split(","):
            name = DECLARATOR_NAME.match(decl.strip()).group(1)
            out.append(' ::emu::static_smem(&%s, sizeof(%s), "%s:%d");' % (name, name, path, line_of(s, m.start())))
        last = m.end()
    out.append(s[last:])
    return "".join(out)


def rewrite(text, path, template_kernels):
    s = rewrite_shared(text, path) if "__shared__" in text else text
    if "<<<" in s:
        s = rewrite_launches(s, path, template_kernels)
    if s == text:
        return s
    return '#line 1 "%s"\n%s' % (path, s)


def find_sources(src, dirs):
    roots = [os.path.join(src, d) for d in dirs] if dirs else [src]
    for root0 in roots:
        if os.path.isfile(root0):
            yield root0
            continue
        for root, subdirs, files in os.walk(root0):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in SKIP_DIRS)
            for f in sorted(files):
                if f.endswith(SOURCE_EXT):
                    yield os.path.join(root, f)


def write_if_changed(path, text):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: a parallel build never reads half a file
    return True


def main():
    if len(sys.argv) == 2 and os.path.isfile(sys.argv[1]):
        text = open(sys.argv[1], encoding="utf-8").read()
        sys.stdout.write(rewrite(text, sys.argv[1], set(TEMPLATE_KERNEL.findall(text))))
        return
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    src, dst, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    files = list(find_sources(src, dirs))
    texts = {}
    for p in files:
        with open(p, encoding="utf-8") as f:
            texts[p] = f.read()
    template_kernels = set()
    for t in texts.values():
        template_kernels.update(TEMPLATE_KERNEL.findall(t))
    changed = 0
    for p, t in texts.items():
        rel = os.path.relpath(p, src)
        changed += write_if_changed(os.path.join(dst, rel), rewrite(t, rel, template_kernels))
    print("cu2cpp: %d files mirrored into %s, %d updated" % (len(files), dst, changed), file=sys.stderr)


if __name__ == "__main__":
    main()
