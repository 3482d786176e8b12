#!/usr/bin/env python3
"""Checks that no Rust module imports from a module that imports it back, in every crate of
the workspace (docs/architecture.md: each module uses only those below it in the data flow).

A module is a source file (`src/a/b.rs` or `src/a/b/mod.rs` is `a::b`). Module A depends on
module B when A's code, outside its `#[cfg(test)]` part and its comments, names a path into B
(`use crate::b::Item`, `crate::b::f()`, `super::b`, `self::b`), B being the longest module
that prefixes the path. A crate root's `pub use` re-exports are its facade
and not counted. A cycle is a set of modules that reach one another through such
dependencies; any cycle fails the check, listing its modules and the lines that close it.

Usage: python3 scripts/check-modules.py [ROOT]   (default: the repository)
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE = re.compile(r"\buse\s+([^;]*);", re.S)


def crates(root: Path) -> list[Path]:
    """The `src/` directories of the workspace's members."""
    manifest = tomllib.loads((root / "Cargo.toml").read_text())
    members = manifest.get("workspace", {}).get("members", [])
    return [root / m / "src" for m in members if (root / m / "src").is_dir()]


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts.pop()
    return tuple(parts)


def code_of(text: str) -> str:
    """The file without its test module and its comments."""
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*mod\s+\w+\s*\{", text, re.M)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def expand(tree: str) -> list[str]:
    """`a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e` (with `self` folded)."""
    tree = "".join(tree.split())
    brace = tree.find("{")
    if brace < 0:
        return [re.sub(r"::self$", "", tree.split(" as ")[0])]
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    out, depth, start = [], 0, 0
    for i, ch in enumerate(inner + ","):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            item = inner[start:i]
            start = i + 1
            if item:
                out.extend(expand(prefix + item))
    return [re.sub(r"::self$", "", p).rstrip(":") for p in out]


def resolve(path: str, here: tuple[str, ...], children: set[str]) -> tuple[str, ...] | None:
    """The module path a `crate::`/`super::`/`self::` path starts from, as segments."""
    segments = path.split("::")
    head, rest = segments[0], segments[1:]
    if head == "crate":
        return tuple(rest)
    # `self` is this module; `super` its parent.
    base = list(here)
    if head == "super":
        base = base[:-1]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    elif head in children:
        # A bare path into a child module (`use intake::Intake;`, `delivery::run()`).
        rest = segments
    elif head != "self":
        return None
    return tuple(base + rest)


def check(root: Path) -> list[str]:
    problems = []
    for src in crates(root):
        files = {module_of(src, f): f for f in sorted(src.rglob("*.rs"))}
        edges: dict[tuple[str, ...], dict[tuple[str, ...], str]] = {m: {} for m in files}
        for module, file in files.items():
            text = file.read_text()
            code = code_of(text)
            children = {m[-1] for m in files if len(m) == len(module) + 1 and m[:-1] == module}
            paths = []
            for use in USE.finditer(code):
                # A crate root's `pub use` is the crate's facade, not a use of the module.
                facade = module == () and re.search(r"\bpub(\([^)]*\))?\s+use\s*$", code[: use.start() + 3])
                if not facade:
                    paths.extend(expand(use.group(1)))
            body = USE.sub("", code)
            paths.extend(m.group(0) for m in PATH.finditer(body))
            for child in children:
                paths.extend(m.group(0) for m in re.finditer(rf"(?<![:\w]){child}(?:::\w+)+", body))
            for path in paths:
                target = resolve(path, module, children)
                if target is None:
                    continue
                while target and target not in files:
                    target = target[:-1]
                if target != module and target in files:
                    edges[module].setdefault(target, path)
        for cycle in strongly_connected(edges):
            names = sorted("::".join(m) or "(crate root)" for m in cycle)
            closing = [
                f"    {'::'.join(a) or '(root)'} -> {'::'.join(b) or '(root)'} ({path})"
                for a in sorted(cycle)
                for b, path in sorted(edges[a].items())
                if b in cycle
            ]
            problems.append(
                f"{src.relative_to(root)}: modules that import each other: {', '.join(names)}\n"
                + "\n".join(closing)
            )
    return problems


def strongly_connected(edges):
    """Tarjan's algorithm; only components of more than one module."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    problems = check(root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"check-modules: {len(problems)} import cycle(s)", file=sys.stderr)
        return 1
    print(f"check-modules: no import cycles in {len(crates(root))} crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
