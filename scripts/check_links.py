"""Checks that every relative link in README.md, benchmarks/README.md and docs/*.md points to a file that exists,
and that a link's #anchor names a heading of that file. Exits 1 if one does not.

    python scripts/check_links.py
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def anchors(path):
    """The anchors GitHub gives the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.*)$", read(path), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def broken_links(path):
    text = re.sub(r"```.*?```", "", read(path), flags=re.DOTALL)  # code blocks hold no links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(linked):
            yield f"{os.path.relpath(path, ROOT)}: {target}: no such file"
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            yield f"{os.path.relpath(path, ROOT)}: {target}: no such heading"


def main():
    pages = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "README.md")]
    pages += sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    problems = [problem for page in pages for problem in broken_links(page)]
    for problem in problems:
        print(problem)
    print(f"{len(pages)} pages, " + (f"{len(problems)} broken links" if problems else "every relative link resolves"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
