#!/usr/bin/env python3
"""The module dependency graph of a Rust crate, derived from its sources; exits 1 on a cycle.

    scripts/module-graph.py CRATE_DIR [--within MODULE | --every] [--dot]
    scripts/module-graph.py --self-test

Reads the crate's module tree from src/lib.rs (or src/main.rs for a binary-only crate),
following `mod x;` declarations, `#[path]` attributes and inline `mod x { ... }` blocks. Every
path that names a module of the crate counts as a dependency of the module it is written in:
`crate::x::...`, `super::...`, `self::...` (also inside `use` groups such as
`use crate::{a::b, c}`), and bare paths that start with a child module's name. Comments and
string literals are ignored; test code counts (a cycle through tests is still a cycle).

By default the graph is between the crate's top-level modules; `--within agent` draws it
between the children of `agent` (for `crate::agent::x`, the node is `x`); `--every` checks the
crate's top level and the children of every module that has any, printing only cycles. The graph is printed
one module per line (`a -> b, c`); every cycle is printed with the references that close it
(file:line), and the exit status is 1 if there is one, 2 on a usage error. `--self-test` runs
the script against small crates written to a temporary directory.
"""

import argparse
import contextlib
import io
import os
import re
import sys

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def strip(src):
    """`src` with comments, strings and char literals blanked out (newlines kept)."""
    out = []
    i, n = 0, len(src)

    def blank(s):
        return "".join("\n" if c == "\n" else " " for c in s)

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(src[i:j]))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(src[i:j]))
            i = j
        else:
            m = re.compile(r'b?r(#*)"').match(src, i)
            prev = src[i - 1] if i else " "
            if m and not (prev.isalnum() or prev == "_"):
                end = '"' + m.group(1)
                j = src.find(end, m.end())
                j = n if j < 0 else j + len(end)
                out.append(blank(src[i:j]))
                i = j
            elif c == '"' or (c == "b" and src.startswith('b"', i) and not (prev.isalnum() or prev == "_")):
                j = i + (2 if c == "b" else 1)
                while j < n and src[j] != '"':
                    j += 2 if src[j] == "\\" else 1
                out.append(blank(src[i : j + 1]))
                i = j + 1
            elif c == "'":
                # A char literal ('a', '\n', '\u{1F600}'), not a lifetime ('a).
                m = re.compile(r"'(\\(u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'])'").match(src, i)
                if m:
                    out.append(blank(m.group(0)))
                    i = m.end()
                else:
                    out.append(c)
                    i += 1
            else:
                out.append(c)
                i += 1
    return "".join(out)


class Module:
    def __init__(self, path, file):
        self.path = path  # tuple of names from the crate root
        self.file = file
        self.children = {}  # name -> Module


MOD_DECL = re.compile(
    r"((?:#\s*\[[^\]]*\]\s*)*)(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*([;{])"
)
PATH_ATTR = re.compile(r'#\s*\[\s*path\s*=\s*"([^"]+)"\s*\]')


def child_dir(file, is_root_like):
    d = os.path.dirname(file)
    if is_root_like:
        return d
    return os.path.join(d, os.path.splitext(os.path.basename(file))[0])


def load_tree(root_file):
    """Every module of the crate: path -> Module, and file -> (source, stripped source)."""
    modules = {}
    files = {}

    def visit(path, file, is_root_like):
        if file in files:
            return
        with open(file, encoding="utf-8") as f:
            raw = f.read()
        text = strip(raw)
        files[file] = (raw, text)
        m = modules.setdefault(path, Module(path, file))
        # Declarations, with the inline-module nesting they sit in.
        for decl_path, name, kind, attrs in declarations(raw, text, path):
            parent = modules.setdefault(decl_path, Module(decl_path, file))
            child = decl_path + (name,)
            if kind == "{":
                parent.children[name] = modules.setdefault(child, Module(child, file))
                continue
            base = child_dir(file, is_root_like)
            # Declarations inside inline modules nest their files under the inline path.
            for p in decl_path[len(path):]:
                base = os.path.join(base, p)
            pa = PATH_ATTR.search(attrs)
            if pa:
                target = os.path.normpath(os.path.join(os.path.dirname(file), pa.group(1)))
                root_like = os.path.basename(target) == "mod.rs"
            else:
                a, b = os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")
                target, root_like = (a, False) if os.path.exists(a) else (b, True)
            if not os.path.exists(target):
                continue  # generated or cfg'd out; nothing to read
            parent.children[name] = modules.setdefault(child, Module(child, target))
            visit(child, target, root_like)
        del m

    visit((), root_file, True)
    return modules, files


def scopes(text, base):
    """Yields (offset, module path) at every change of inline-module nesting in `text`."""
    stack = []  # (brace depth at which the inline module's body started, name)
    depth = 0
    tokens = re.compile(r"\bmod\s+([A-Za-z_][A-Za-z0-9_]*)\s*\{|[{}]")
    for m in tokens.finditer(text):
        if m.group(1):
            depth += 1
            stack.append((depth, m.group(1)))
            yield m.end(), base + tuple(n for _, n in stack)
        elif m.group(0) == "{":
            depth += 1
        else:
            if stack and stack[-1][0] == depth:
                stack.pop()
                yield m.end(), base + tuple(n for _, n in stack)
            depth -= 1


def module_at(changes, offset, base):
    cur = base
    for at, path in changes:
        if at > offset:
            break
        cur = path
    return cur


def declarations(raw, text, base):
    changes = list(scopes(text, base))
    for m in MOD_DECL.finditer(text):
        # Attributes were blanked only if they held strings; read them from the raw text.
        attrs = raw[m.start(1) : m.end(1)]
        yield module_at(changes, m.start(), base), m.group(2), m.group(3), attrs


PATH_START = re.compile(r"(?<![A-Za-z0-9_:$])((?:crate|super|self|[A-Za-z_][A-Za-z0-9_]*))\s*::")


def parse_path(text, i):
    """Parses `seg::seg::{a, b::c}` starting at `i`; returns (list of segment lists, end)."""
    segs = []
    n = len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == "{":
            i += 1
            results = []
            while True:
                while i < n and text[i] in " \t\r\n,":
                    i += 1
                if i >= n or text[i] == "}":
                    i += 1
                    break
                sub, i = parse_path(text, i)
                results.extend(segs + s for s in sub)
                # skip `as name`
                m = re.compile(r"\s*as\s+[A-Za-z_][A-Za-z0-9_]*").match(text, i)
                if m:
                    i = m.end()
            return results or [segs], i
        if i < n and text[i] == "*":
            return [segs], i + 1
        m = IDENT.match(text, i)
        if not m:
            return [segs], i
        segs.append(m.group(0))
        i = m.end()
        m2 = re.compile(r"\s*::").match(text, i)
        if not m2:
            return [segs], i
        i = m2.end()


def resolve(segs, here, modules):
    """The absolute module path a reference `segs` written in module `here` points into."""
    if not segs:
        return None
    if segs[0] == "crate":
        cur, rest = (), segs[1:]
    elif segs[0] in ("super", "self"):
        cur, rest = here, segs
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                if not cur:
                    return None
                cur = cur[:-1]
            rest = rest[1:]
    elif here in modules and segs[0] in modules[here].children:
        cur, rest = here, segs
    else:
        return None  # another crate, a type, a local item
    # Walk down as far as the segments name modules.
    for s in rest:
        if cur + (s,) in modules:
            cur = cur + (s,)
        else:
            break
    return cur


def references(modules, files):
    """(from module path, to module path, file, line) for every reference in the crate."""
    by_file = {}
    for m in modules.values():
        by_file.setdefault(m.file, []).append(m.path)
    for file, (raw, text) in files.items():
        base = min(by_file[file], key=len)
        changes = list(scopes(text, base))
        for m in PATH_START.finditer(text):
            prev = text[: m.start()].rstrip()
            # `mod x` and `fn x::` do not occur; skip `::x::` continuations and macros' `$crate`.
            if prev.endswith("::"):
                continue
            here = module_at(changes, m.start(), base)
            for segs in parse_path(text, m.start())[0]:
                target = resolve(segs, here, modules)
                if target is not None:
                    line = text.count("\n", 0, m.start()) + 1
                    yield here, target, file, line


def project(path, within):
    """The node of `path` at the level below `within`, or None if outside it."""
    if path[: len(within)] != within or len(path) <= len(within):
        return None
    return path[len(within)]


def sccs(nodes, edges):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return out


def crate(crate_dir):
    """(root file, modules, references) of the crate in `crate_dir`."""
    src = os.path.join(crate_dir, "src")
    root = next(
        (os.path.join(src, f) for f in ("lib.rs", "main.rs") if os.path.exists(os.path.join(src, f))),
        None,
    )
    if root is None:
        raise LookupError(f"no src/lib.rs or src/main.rs in {crate_dir}")
    modules, files = load_tree(root)
    return root, modules, list(references(modules, files))


def graph(crate_dir, within=(), loaded=None):
    """(nodes, edges, evidence, root file) of `crate_dir`, at the level below `within`.
    `loaded`: what [`crate`] returned for it, to read the sources once for many graphs."""
    root, modules, refs = loaded or crate(crate_dir)
    if within not in modules:
        raise LookupError(f"no module {'::'.join(within)!r} in {crate_dir}")
    nodes = set(modules[within].children)
    edges, evidence = {}, {}
    for here, target, file, line in refs:
        x, y = project(here, within), project(target, within)
        if x is None or y is None or x == y:
            continue
        edges.setdefault(x, set()).add(y)
        evidence.setdefault((x, y), f"{os.path.relpath(file)}:{line}")
    return nodes, edges, evidence, root


SELF_TEST = {
    # A cycle through `crate::`, a `use` group, `super::`, and an inline module; comments,
    # strings and a bare path to a child are not references to `c`.
    "cycle/src/lib.rs": "pub mod a;\npub mod b;\npub mod c;\nmod d { pub fn f() {} }\n",
    "cycle/src/a.rs": "use crate::{b::x, d};\n// crate::c::nothing\nconst S: &str = \"crate::c\";\n",
    "cycle/src/b/mod.rs": "pub mod x;\npub fn g() { x::h(); }\n",
    "cycle/src/b/x.rs": "pub fn h() { super::super::a::f(); }\nmod t { fn k() { super::super::g(); } }\n",
    "cycle/src/c.rs": "pub fn c() { let _ = '{'; }\n",
    # No cycle: `super::` inside an inline test module is the module itself.
    "acyclic/src/lib.rs": "pub mod a;\npub mod b;\n",
    "acyclic/src/a.rs": "pub fn f() { crate::b::g(); }\n#[cfg(test)]\nmod tests { use super::f; }\n",
    "acyclic/src/b.rs": "pub fn g() {}\n#[cfg(test)]\nmod tests { use super::*; fn t() { super::g(); } }\n",
}


def self_test():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for path, text in SELF_TEST.items():
            os.makedirs(os.path.dirname(os.path.join(d, path)), exist_ok=True)
            with open(os.path.join(d, path), "w", encoding="utf-8") as f:
                f.write(text)
        nodes, edges, _, _ = graph(os.path.join(d, "cycle"))
        want = {"a": {"b", "d"}, "b": {"a"}}
        assert nodes == {"a", "b", "c", "d"}, nodes
        assert edges == want, edges
        assert [c for c in sccs(nodes, edges) if len(c) > 1] == [["a", "b"]]
        nodes, edges, _, _ = graph(os.path.join(d, "cycle"), ("b",))
        assert nodes == {"x"} and edges == {}, (nodes, edges)
        nodes, edges, _, _ = graph(os.path.join(d, "acyclic"))
        assert edges == {"a": {"b"}}, edges
        # --every: the top level's cycle is found; `b` has one child, so it is no level.
        quiet = io.StringIO()
        with contextlib.redirect_stderr(quiet):
            assert every(os.path.join(d, "cycle")) == (1, 1)
        assert "cycle: a <-> b" in quiet.getvalue(), quiet.getvalue()
        assert every(os.path.join(d, "acyclic")) == (1, 0)
    print("module-graph: self-test passed")
    return 0


def report_cycles(name, nodes, edges, evidence):
    """Prints every cycle among `nodes` with the references that close it; how many."""
    cycles = [c for c in sccs(nodes, edges) if len(c) > 1]
    for c in cycles:
        print(f"cycle: {' <-> '.join(c)}", file=sys.stderr)
        for v in c:
            for w in sorted(edges.get(v, ())):
                if w in c:
                    print(f"  {v} -> {w}  ({evidence[(v, w)]})", file=sys.stderr)
    if cycles:
        print(f"module-graph: {len(cycles)} cycle(s) in {name}", file=sys.stderr)
    return len(cycles)


def every(crate_dir, loaded=None):
    """(levels checked, cycles found) over the children of every module with two or more."""
    loaded = loaded or crate(crate_dir)
    modules = loaded[1]
    levels = [m for m in sorted(modules) if len(modules[m].children) > 1]
    found = 0
    for m in levels:
        nodes, edges, evidence, _ = graph(crate_dir, m, loaded)
        found += report_cycles("::".join(("crate",) + m), nodes, edges, evidence)
    return len(levels), found


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("crate_dir", help="directory with Cargo.toml and src/")
    ap.add_argument("--within", default="", help="draw the children of this module (a::b)")
    ap.add_argument("--every", action="store_true", help="check every level; print cycles only")
    ap.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of text")
    a = ap.parse_args()
    within = tuple(p for p in a.within.split("::") if p)
    try:
        loaded = crate(a.crate_dir)
        if a.every:
            levels, found = every(a.crate_dir, loaded)
            print(f"{a.crate_dir}: {levels} levels, {found} cycle(s)")
            return 1 if found else 0
        nodes, edges, evidence, root = graph(a.crate_dir, within, loaded)
    except LookupError as e:
        print(f"module-graph: {e}", file=sys.stderr)
        return 2
    name = "::".join(("crate",) + within)
    if a.dot:
        print(f'digraph "{name}" {{')
        for v in sorted(nodes):
            print(f'  "{v}";')
            for w in sorted(edges.get(v, ())):
                print(f'  "{v}" -> "{w}";')
        print("}")
    else:
        print(f"{name} ({os.path.relpath(root)}): {len(nodes)} modules")
        for v in sorted(nodes):
            print(f"  {v} -> {', '.join(sorted(edges.get(v, ()))) or '(none)'}")
    return 1 if report_cycles(name, nodes, edges, evidence) else 0


if __name__ == "__main__":
    sys.exit(main())
