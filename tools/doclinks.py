"""Links from the docs to lines of code that say which code they mean, so they can be checked and moved.

A link to a line range carries its target as the link title:

    [Conv2d.backward](../minicnn/layers/conv.py#L62-L77 "Conv2d.backward")
    [L57](../minicnn/im2col.py#L57 "im2col: col[:, :, ky, kx] = ")

The title is ``SYMBOL`` (a function, class or ``Class.method``: the link covers all
its lines) or ``SYMBOL: TEXT`` (the first line inside SYMBOL whose code starts with
TEXT, and as many lines after it as the link had). SYMBOL may be empty for
module-level code (``": IMAGENET_MEAN = "``).

    python tools/doclinks.py            # list the links whose line numbers are wrong (exit 1 if any)
    python tools/doclinks.py --fix      # rewrite their line numbers (and link texts that show them)

tests/test_doclinks.py runs the check, so a change that moves code fails until
the docs are regenerated.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = ("docs/*.md", "README.md", "benchmarks/*.md")
# [text](path.py#L10-L20 "title")    the title is optional when reading (a link without one is an error)
SHOWN_ANCHOR = re.compile(r"L\d+(?:-L\d+)?$")          # a link text that ends by showing its lines
LINK = re.compile(r'\[(?P<text>[^\]]*)\]\((?P<path>[^)\s#]+\.py)#L(?P<start>\d+)(?:-L(?P<end>\d+))?'
                  r'(?:\s+"(?P<title>(?:[^"\\]|\\.)*)")?\)')


@dataclass
class Link:
    doc: Path
    line: int                 # 1-based line in the doc
    match: re.Match

    @property
    def source(self) -> Path:
        return (self.doc.parent / self.match["path"]).resolve()

    @property
    def span(self) -> tuple[int, int]:
        start = int(self.match["start"])
        return start, int(self.match["end"] or start)

    @property
    def title(self) -> str | None:
        title = self.match["title"]
        return None if title is None else title.replace('\\"', '"')


def symbols(source: str) -> dict[str, tuple[int, int]]:
    """{"name" or "Class.name": (first line, last line)} for every def and class, 1-based."""
    found = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                found.setdefault(name, (child.lineno, child.end_lineno))
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return found


def resolve(title: str, source: str, length: int) -> tuple[int, int]:
    """The (start, end) lines ``title`` names in ``source``; ValueError with a sentence if none."""
    symbol, _, text = title.partition(":")
    symbol, text = symbol.strip(), text.strip()
    lines = source.splitlines()
    if symbol:
        table = symbols(source)
        if symbol not in table:
            raise ValueError(f"no function or class {symbol!r}")
        first, last = table[symbol]
    else:
        first, last = 1, len(lines)
    if not text:
        return first, last
    for number in range(first, last + 1):
        if lines[number - 1].strip().startswith(text):
            return number, number + length - 1
    raise ValueError(f"no line starting with {text!r} in {symbol or 'the module'} (lines {first}-{last})")


def links(paths=None) -> list[Link]:
    paths = paths or [p for pattern in DOCS for p in sorted(REPO.glob(pattern))]
    found = []
    for doc in paths:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            found += [Link(doc, number, match) for match in LINK.finditer(line)]
    return found


def problems(link: Link) -> tuple[str | None, tuple[int, int] | None]:
    """(what is wrong, the right span) for one link; (None, span) when it is right."""
    doc = link.doc.relative_to(REPO) if link.doc.is_relative_to(REPO) else link.doc
    where = f"{doc}:{link.line}: {link.match['path']}#L{link.span[0]}"
    if link.title is None:
        return f"{where}: no title naming the symbol it points at", None
    if not link.source.is_file():
        return f"{where}: {link.source} does not exist", None
    start, end = link.span
    try:
        span = resolve(link.title, link.source.read_text(), end - start + 1)
    except (ValueError, SyntaxError) as error:
        return f"{where}: {link.title!r}: {error}", None
    if span != (start, end):
        return f"{where}: {link.title!r} is at lines {span[0]}-{span[1]}, not {start}-{end}", span
    shown = SHOWN_ANCHOR.search(link.match["text"])
    if shown and shown.group(0) != anchor(span):
        return f"{where}: the link text shows {shown.group(0)}, the link goes to {anchor(span)}", span
    return None, span


def anchor(span) -> str:
    return f"L{span[0]}" if span[0] == span[1] else f"L{span[0]}-L{span[1]}"


def fixed(link: Link, span) -> str:
    """The link's markdown with the new span (and a text that showed the old one updated)."""
    text = SHOWN_ANCHOR.sub(anchor(span), link.match["text"])
    title = link.title.replace('"', '\\"')
    return f'[{text}]({link.match["path"]}#{anchor(span)} "{title}")'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite wrong line numbers in place")
    args = parser.parse_args(argv)
    bad = 0
    for doc in {link.doc for link in links()}:
        text = doc.read_text().splitlines(keepends=True)
        for link in [link for link in links([doc])]:
            problem, span = problems(link)
            if problem is None:
                continue
            bad += 1
            print(problem)
            if args.fix and span is not None:
                line = text[link.line - 1]
                text[link.line - 1] = line.replace(link.match.group(0), fixed(link, span), 1)
        if args.fix:
            doc.write_text("".join(text))
    return 1 if bad and not args.fix else 0


if __name__ == "__main__":
    sys.exit(main())
