#!/usr/bin/env python3
"""Build the bundled demo corpus and the demo SFT conversation set.

    python scripts/build_demo_corpus.py --out aquila/data/demo

Writes, under --out:

  train.jsonl.gz   the pretraining corpus, one JSON object a line:
                   {"text": ..., "source": ..., "lang": "zh" | "en" | "code"}
  valid.jsonl.gz   the held-out split (same format), about 4% of the records
  chat.jsonl       a few hundred short bilingual exchanges in FlagAI's SFT format:
                   {"id": ..., "conversations": [{"from": "human", "value": ...},
                    {"from": "gpt", "value": ...}, ...], "instruction": ...}
  NOTICE.md        every source: package, version, license, and how it was used

The text comes from freely licensed packages of two package registries, fetched
with their ordinary clients and never installed:

  * Debian (bookworm) packages, by `apt-get download NAME=VERSION` and
    `dpkg-deb -x` into the cache directory;
  * the npm package chinese-poetry, by `npm pack chinese-poetry@VERSION`.

Versions are pinned below (PINS). Same inputs give byte-identical outputs: the
inputs are read in sorted order, every choice is made by a hash of a document's
key (never by a random generator seeded from the clock), records are written
with sorted keys, and the gzip streams carry no name and mtime 0.

The script needs the network (the two registries) and `apt-get`, `dpkg-deb` and
`npm`; it is not run by CI: its outputs are committed. It prints the share of
each language (measured in Unicode characters of the "text" fields) and the
sizes at the end.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter, OrderedDict, defaultdict
from html.parser import HTMLParser

# --------------------------------------------------------------------------
# Pinned inputs
# --------------------------------------------------------------------------

DEBIAN_RELEASE = "Debian 12 (bookworm), main + bookworm-security"

# name -> (version, license as recorded by the package's copyright file, what we use)
DEB_PINS = OrderedDict([
    ("libreoffice-help-zh-cn", ("4:7.4.7-1+deb12u14", "MPL-2.0 (some files Apache-2.0)",
                                "Chinese help pages (HTML) of LibreOffice 7.4")),
    ("libreoffice-help-en-us", ("4:7.4.7-1+deb12u14", "MPL-2.0 (some files Apache-2.0)",
                                "English help pages (HTML) of LibreOffice 7.4, paired by path with the Chinese ones")),
    ("debian-reference-zh-cn", ("2.100", "GPL-2+",
                                "Chinese translation of the Debian Reference (HTML chapters)")),
    ("fortunes-zh", ("2.98", "GPL-3+ (the collection); the poems themselves are public domain",
                     "tang300 (300 Tang poems) and song100 (Song poems) in simplified characters")),
    ("python3.11-doc", ("3.11.2-6+deb12u9", "PSF-2.0 (Python documentation licence)",
                        "reStructuredText sources of the Python 3.11 documentation")),
    ("jargon-text", ("4.4.7-4.1", "public domain",
                     "The Jargon File 4.4.7 (plain text)")),
    ("bible-kjv-text", ("4.38", "public domain (King James Version, 1611)",
                        "the KJV text, in the package's compressed format")),
    ("bible-kjv", ("4.38", "GPL-2+",
                   "tool only: its `bible` program decodes bible-kjv-text; none of its files is redistributed")),
    ("libpython3.11-stdlib", ("3.11.2-6+deb12u9", "PSF-2.0 (usr/lib/python3.11/LICENSE.txt)",
                              "pure-Python modules of the CPython 3.11 standard library")),
])

NPM_PINS = OrderedDict([
    ("chinese-poetry", ("2.0.1", "MIT (the compilation); the poems and classics are public domain",
                        "Song ci, Yuan qu, Shijing, Chuci, Lunyu, and other simplified-character collections")),
])

# --------------------------------------------------------------------------
# Budgets (Unicode characters of text per source); the shares follow from them
# --------------------------------------------------------------------------

MAX_DOC_CHARS = 8000          # documents are cut at paragraph boundaries below this
VALID_PER_MILLE = 40          # ~4% of documents held out, by a hash of the document key

BUDGETS = OrderedDict([
    # zh
    ("chinese-poetry", 1_100_000),
    ("fortunes-zh", 60_000),          # all of tang300 + song100 (~40k)
    ("libreoffice-help-zh-cn", 860_000),
    ("debian-reference-zh-cn", 440_000),  # all of it (~175k)
    # en
    ("python3.11-doc", 850_000),
    ("libreoffice-help-en-us", 750_000),
    ("bible-kjv-text", 330_000),
    ("jargon-text", 300_000),
    # code
    ("libpython3.11-stdlib", 1_100_000),
])

SOURCE_LANG = {
    "chinese-poetry": "zh", "fortunes-zh": "zh", "libreoffice-help-zh-cn": "zh",
    "debian-reference-zh-cn": "zh", "python3.11-doc": "en", "libreoffice-help-en-us": "en",
    "bible-kjv-text": "en", "jargon-text": "en", "libpython3.11-stdlib": "code",
}


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def hkey(s: str) -> int:
    """A stable pseudo-random number from a string (deterministic ordering)."""
    return int(sha(s)[:16], 16)


CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\u200e\u200f\ufeff]")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def cjk_ratio(s: str) -> float:
    t = re.sub(r"\s", "", s)
    return len(CJK_RE.findall(t)) / max(1, len(t))


def clean_text(s: str, verbatim: bool = False) -> str:
    """NFC, no control characters, no trailing spaces, at most one blank line in a row.

    Prose (verbatim=False) also has runs of spaces inside a line collapsed and
    lines stripped; verbatim text (code, reST) keeps its indentation and tabs
    are expanded."""
    s = unicodedata.normalize("NFC", s)
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = ANSI_RE.sub("", s)
    if verbatim:
        s = s.expandtabs(8)
    s = s.replace("\u00a0", " ").replace("\u2028", "\n").replace("\u2029", "\n")
    s = CTRL_RE.sub("", s.replace("\t", " ") if not verbatim else s)
    lines = []
    for line in s.split("\n"):
        line = line.rstrip()
        if not verbatim:
            line = re.sub(r"[ \t]+", " ", line).strip()
        lines.append(line)
    s = "\n".join(lines)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip("\n")


def split_paragraphs_limited(text: str, limit: int, code: bool = False) -> list[str]:
    """Cut text into pieces of at most `limit` characters, at paragraph
    boundaries (blank lines; for code, preferably before an unindented line),
    falling back to line boundaries, then to a hard cut."""
    if len(text) <= limit:
        return [text]
    if code:
        units = re.split(r"\n\n(?=\S)", text)
        seps = "\n\n"
    else:
        units = text.split("\n\n")
        seps = "\n\n"
    pieces: list[str] = []
    for u in units:
        if len(u) <= limit:
            pieces.append(u)
            continue
        sub = u.split("\n\n") if code else u.split("\n")
        for v in sub:
            while len(v) > limit:
                pieces.append(v[:limit])
                v = v[limit:]
            pieces.append(v)
    out: list[str] = []
    cur = ""
    for p in pieces:
        if not cur:
            cur = p
        elif len(cur) + len(seps) + len(p) <= limit:
            cur = cur + seps + p
        else:
            out.append(cur)
            cur = p
    if cur:
        out.append(cur)
    return [o.strip("\n") for o in out if o.strip()]


def pack_items(items: list[str], limit: int, sep: str = "\n\n") -> list[list[str]]:
    """Group consecutive short items into documents of at most `limit` chars."""
    groups: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for it in items:
        if cur and size + len(sep) + len(it) > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += len(it) + (len(sep) if size else 0)
    if cur:
        groups.append(cur)
    return groups


class Doc:
    """One document before chunking: `key` is unique and stable (package:path#part)."""

    __slots__ = ("key", "source", "lang", "text", "code")

    def __init__(self, key: str, source: str, lang: str, text: str, code: bool = False):
        self.key, self.source, self.lang, self.text, self.code = key, source, lang, text, code


# --------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------

def run(cmd: list[str], cwd: str | None = None) -> str:
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.PIPE,
                          text=True).stdout


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache: str, offline: bool) -> dict[str, dict]:
    """Download (unless cached) and unpack every pinned package; return
    {package: {"dir": unpacked root, "archive": file name, "sha256": ...}}."""
    os.makedirs(cache, exist_ok=True)
    got: dict[str, dict] = {}
    for name, (version, _lic, _use) in DEB_PINS.items():
        quoted = version.replace(":", "%3a")
        found = sorted(glob.glob(os.path.join(cache, f"{name}_{quoted}_*.deb")))
        if not found:
            if offline:
                sys.exit(f"{name}={version} is not in {cache} and --offline was given")
            try:
                run(["apt-get", "download", f"{name}={version}"], cwd=cache)
            except subprocess.CalledProcessError:
                sys.exit(f"apt-get could not download {name}={version}: run `apt-get update`; "
                         "if the archive dropped that version, update DEB_PINS (and NOTICE.md) "
                         "to the current one")
            found = sorted(glob.glob(os.path.join(cache, f"{name}_{quoted}_*.deb")))
        deb = found[0]
        real = run(["dpkg-deb", "-f", deb, "Version"]).strip()
        if real != version:
            sys.exit(f"{deb}: version {real}, expected {version}")
        dest = os.path.join(cache, "x", name)
        if not os.path.isdir(dest):
            os.makedirs(dest + ".tmp", exist_ok=True)
            run(["dpkg-deb", "-x", deb, dest + ".tmp"])
            os.rename(dest + ".tmp", dest)
        got[name] = {"dir": dest, "archive": os.path.basename(deb), "sha256": file_sha256(deb)}
    for name, (version, _lic, _use) in NPM_PINS.items():
        tgz = os.path.join(cache, f"{name}-{version}.tgz")
        if not os.path.exists(tgz):
            if offline:
                sys.exit(f"{tgz} missing and --offline was given")
            run(["npm", "pack", f"{name}@{version}", "--pack-destination", cache], cwd=cache)
        dest = os.path.join(cache, "x", name)
        if not os.path.isdir(dest):
            os.makedirs(dest + ".tmp", exist_ok=True)
            run(["tar", "-xzf", tgz, "-C", dest + ".tmp"])
            os.rename(dest + ".tmp", dest)
        got[name] = {"dir": dest, "archive": os.path.basename(tgz), "sha256": file_sha256(tgz)}
    return got


# --------------------------------------------------------------------------
# HTML to paragraphs
# --------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
        "param", "source", "track", "wbr"}
BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "pre", "td", "th", "dt", "dd",
         "div", "tr", "table", "ul", "ol", "dl", "blockquote", "section", "br", "title",
         "caption", "figure", "header", "footer", "aside", "nav", "hr"}


ID_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "pre", "td", "th", "dt", "dd"}


class BlockParser(HTMLParser):
    """Collects the text of block elements as (tag, id, text) triples.

    `skip(tag, attrs)` says whether a whole element (with its children) is to be
    left out. Text inside <pre> keeps its line breaks; elsewhere white space is
    collapsed. A block's id is the id attribute of the nearest enclosing p/h*/li/pre."""

    def __init__(self, skip):
        super().__init__(convert_charrefs=True)
        self.skip = skip
        self.stack: list[str] = []
        self.skip_level: int | None = None
        self.blocks: list[tuple[str, str, str]] = []
        self.buf: list[str] = []
        self.tags: list[tuple[str, str]] = []   # enclosing block tags with their ids
        self.pre = 0

    def flush(self):
        text = "".join(self.buf)
        self.buf = []
        if self.pre:
            text = text.strip("\n")
        else:
            text = re.sub(r"\s+", " ", text).strip()
        if text:
            tag, ident = self.tags[-1] if self.tags else ("", "")
            if not ident:
                for _, i in reversed(self.tags):
                    if i:
                        ident = i
                        break
            self.blocks.append((tag, ident, text))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in VOID:
            if self.skip_level is None and tag in BLOCK:
                self.flush()
            return
        if self.skip_level is None and self.skip(tag, a):
            if tag in BLOCK:
                self.flush()
            self.skip_level = len(self.stack)
        self.stack.append(tag)
        if self.skip_level is not None:
            return
        if tag in BLOCK:
            self.flush()
            ident = (a.get("id") or "") if tag in ID_TAGS else ""
            self.tags.append((tag, ident))
        if tag == "pre":
            self.pre += 1

    def handle_startendtag(self, tag, attrs):
        if self.skip_level is None and tag in BLOCK:
            self.flush()

    def handle_endtag(self, tag):
        if tag in VOID or tag not in self.stack:
            return
        while self.stack:
            t = self.stack.pop()
            if self.skip_level is None:
                if t in BLOCK:
                    self.flush()
                    if self.tags:
                        self.tags.pop()
                if t == "pre":
                    self.pre -= 1
            elif len(self.stack) <= self.skip_level:
                self.skip_level = None
            if t == tag:
                break

    def handle_data(self, data):
        if self.skip_level is None:
            self.buf.append(data)


def html_blocks(path: str, skip) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        p = BlockParser(skip)
        p.feed(f.read())
        p.close()
        p.flush()
    return p.blocks


def blocks_to_text(blocks: list[tuple[str, str, str]]) -> str:
    """Headings and paragraphs are separated by a blank line; list items and
    table cells follow each other on single lines."""
    out: list[str] = []
    prev_tight = False
    for tag, _ident, text in blocks:
        tight = tag in {"li", "td", "th", "dt", "dd", "tr"}
        if tag == "li":
            text = "- " + text
        if out:
            out.append("\n" if (tight and prev_tight) else "\n\n")
        out.append(text)
        prev_tight = tight
    return "".join(out)


# --------------------------------------------------------------------------
# Chinese poetry and classics
# --------------------------------------------------------------------------

def poem_text(title: str, author: str, lines: list[str], extra: str = "") -> str:
    head = f"《{title}》" if title else ""
    if author:
        head += ("\n" if head else "") + f"作者：{author}"
    body = "\n".join(line.strip() for line in lines if line.strip())
    text = head + "\n\n" + body if head else body
    if extra:
        text += "\n\n" + extra
    return text


def load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def collection_docs(src: str, name: str, items: list[str], limit: int = 3000):
    """Pack a collection's items into documents; return the documents and, for
    each item, the key of the document holding it."""
    docs, where = [], []
    for i, group in enumerate(pack_items(items, limit)):
        key = f"{src}:{name}#{i:04d}"
        docs.append(Doc(key, src, "zh", clean_text("\n\n".join(group))))
        where += [key] * len(group)
    return docs, where


def chinese_poetry(root: str, records: dict) -> list[Doc]:
    """Collections in simplified characters only (the Tang/Song shi of the package
    are in traditional characters and are not used)."""
    d = os.path.join(root, "package", "dist")
    src = "chinese-poetry"
    docs: list[Doc] = []
    poems: list[dict] = []

    def add(name: str, items: list[str], limit: int = 3000, meta: list[dict] | None = None):
        ds, where = collection_docs(src, name, items, limit)
        docs.extend(ds)
        for m, key in zip(meta or [], where):
            m["key"] = key
            poems.append(m)

    # 诗经
    items, meta = [], []
    for p in load_json(os.path.join(d, "shijing", "shijing.json")):
        where = "·".join(x for x in (p.get("chapter"), p.get("section")) if x)
        items.append(poem_text(p["title"], "", p["content"]))
        meta.append({"collection": "诗经", "title": p["title"], "author": "", "where": where,
                     "lines": p["content"]})
    add("shijing", items, meta=meta)
    # 楚辞
    add("chuci", [poem_text(p["title"], p.get("author", ""), p["content"])
                  for p in load_json(os.path.join(d, "chuci", "chuci.json"))], 6000)
    # 论语
    add("lunyu", ["《论语·" + p["chapter"] + "》\n\n" + "\n".join(p["paragraphs"])
                  for p in load_json(os.path.join(d, "lunyu", "lunyu.json"))], 6000)
    # 宋词三百首, then the rest of 全宋词 in file order
    seen = set()
    items, meta = [], []
    for p in load_json(os.path.join(d, "songci", "宋词三百首.json")):
        seen.add((p["author"], p["rhythmic"], "".join(p["paragraphs"])))
        items.append(poem_text(p["rhythmic"], p["author"], p["paragraphs"]))
        meta.append({"collection": "宋词三百首", "title": p["rhythmic"], "author": p["author"],
                     "lines": p["paragraphs"]})
    add("songci300", items, meta=meta)
    files = sorted(glob.glob(os.path.join(d, "songci", "ci.song.*.json")),
                   key=lambda f: (int(re.findall(r"\d+", os.path.basename(f))[0]), f))
    items = []
    for f in files:
        for p in load_json(f):
            k = (p["author"], p["rhythmic"], "".join(p["paragraphs"]))
            if k in seen or not p["paragraphs"]:
                continue
            seen.add(k)
            items.append(poem_text(p["rhythmic"], p["author"], p["paragraphs"]))
    add("songci", items)
    # 元曲
    add("yuanqu", [poem_text(p["title"], p.get("author", ""), p["paragraphs"])
                   for p in load_json(os.path.join(d, "yuanqu", "yuanqu.json"))])
    # 曹操诗集, 纳兰性德诗集, 水墨唐诗 (with its modern-Chinese explanations), 幽梦影
    add("caocao", [poem_text(p["title"], "曹操", p["paragraphs"])
                   for p in load_json(os.path.join(d, "caocaoshiji", "caocao.json"))])
    add("nalanxingde", [poem_text(p["title"], p.get("author", "纳兰性德"), p["para"])
                        for p in load_json(os.path.join(d, "nalanxingde", "纳兰性德诗集.json"))])
    items, meta = [], []
    for p in load_json(os.path.join(d, "shuimotangshi", "shuimotangshi.json")):
        items.append(poem_text(p["title"], p["author"], p["paragraphs"], p.get("prologue", "")))
        meta.append({"collection": "水墨唐诗", "title": p["title"], "author": p["author"],
                     "lines": p["paragraphs"]})
    add("shuimotangshi", items, meta=meta)
    add("youmengying", [p["content"] + ("\n" + "\n".join(p["comment"]) if p.get("comment") else "")
                        for p in load_json(os.path.join(d, "youmengying", "youmengying.json"))])
    records["poems"] = records.get("poems", []) + poems
    return docs


def fortunes_zh(root: str, records: dict) -> list[Doc]:
    d = os.path.join(root, "usr", "share", "games", "fortunes")
    src = "fortunes-zh"
    docs: list[Doc] = []
    poems = []
    for name in ("tang300", "song100"):
        with open(os.path.join(d, name), encoding="utf-8") as f:
            raw = ANSI_RE.sub("", f.read())
        items, meta = [], []
        for entry in raw.split("\n%\n"):
            lines = [line.rstrip() for line in entry.strip("\n%").split("\n")]
            if len(lines) < 3:
                continue
            m = re.match(r"^(?:题目[:：])?\s*《(.+?)》(.*)$", lines[0].strip())
            a = re.match(r"^作者[:：]\s*(.+)$", lines[1].strip())
            if not m or not a:
                continue
            title = (m.group(1) + m.group(2)).strip()
            author = a.group(1).strip()
            body_text = clean_text("\n".join(line.strip() for line in lines[2:]))
            items.append(clean_text(f"《{title}》\n作者：{author}\n\n{body_text}"))
            meta.append({"collection": "唐诗三百首" if name == "tang300" else "宋诗一百首",
                         "title": title, "author": re.sub(r"（.*?）$", "", author).strip(),
                         "lines": body_text.split("\n")})
        ds, where = collection_docs(src, name, items, 3000)
        docs.extend(ds)
        if name == "tang300":
            for m, key in zip(meta, where):
                m["key"] = key
                poems.append(m)
    records["poems"] = records.get("poems", []) + poems
    return docs


# --------------------------------------------------------------------------
# LibreOffice help (zh-CN and en-US, paired by path)
# --------------------------------------------------------------------------

def lo_skip(tag, a):
    cls = a.get("class") or ""
    ident = a.get("id") or ""
    if tag in {"head", "header", "aside", "footer", "script", "style", "noscript", "nav",
               "button", "input", "label"}:
        return True
    if a.get("hidden") is not None and cls in {"MAC", "WIN", "UNIX"}:
        return True     # keep the default variant of system-specific text (Ctrl, not Command)
    return tag == "div" and (cls in {"howtoget", "relatedtopics", "debug"}
                             or ident in {"SearchFrame", "DonationFrame", "DEBUG", "Contents"})


def libreoffice_pages(root: str, lang_dir: str) -> dict[str, list[tuple[str, str, str]]]:
    base = os.path.join(root, "usr", "share", "libreoffice", "help", lang_dir, "text")
    pages = {}
    for path in sorted(glob.glob(os.path.join(base, "**", "*.html"), recursive=True)):
        rel = os.path.relpath(path, base)
        blocks = []
        last = None
        for tag, ident, text in html_blocks(path, lo_skip):
            text = clean_text(html.unescape(text))
            if not text or text == last:
                continue
            last = text
            blocks.append((tag, ident, text))
        pages[rel] = blocks
    return pages


def libreoffice_docs(pages_zh, pages_en, records) -> tuple[list[Doc], list[Doc]]:
    """One document per page that exists in both languages; paragraphs repeated
    on more than 3 pages (boilerplate) are dropped; in the Chinese pages,
    paragraphs left untranslated (no Chinese character) are dropped."""
    common = sorted(set(pages_zh) & set(pages_en))
    out = {}
    for lang, pages in (("zh", pages_zh), ("en", pages_en)):
        freq = Counter()
        for rel in common:
            freq.update(set(t for _tag, _i, t in pages[rel]))
        src = "libreoffice-help-zh-cn" if lang == "zh" else "libreoffice-help-en-us"
        docs = []
        for rel in common:
            kept = []
            for tag, ident, text in pages[rel]:
                if freq[text] > 3 and len(text) > 12:
                    continue
                if lang == "zh" and not CJK_RE.search(text) and tag != "pre":
                    continue
                kept.append((tag, ident, text))
            text = clean_text(blocks_to_text(kept))
            if len(text) < (150 if lang == "zh" else 300):
                continue
            docs.append(Doc(f"{src}:{rel}", src, lang, text))
        out[lang] = docs
    # paragraph pairs for the translation exchanges
    pairs = []
    for rel in common:
        en = {i: t for tag, i, t in pages_en[rel] if i and tag in {"p", "h1", "h2", "h3", "li"}}
        for tag, i, t in pages_zh[rel]:
            if not i or i not in en or tag not in {"p", "h1", "h2", "h3", "li"}:
                continue
            e = en[i]
            if cjk_ratio(t) < 0.4 or CJK_RE.search(e) or not (25 <= len(e) <= 220):
                continue
            if not re.search(r"[a-z]{3,}", e) or len(t) < 8:
                continue
            pairs.append({"page": rel, "id": i, "zh": t, "en": e,
                          "key_zh": f"libreoffice-help-zh-cn:{rel}",
                          "key_en": f"libreoffice-help-en-us:{rel}"})
    records["lo_pairs"] = pairs
    return out["zh"], out["en"]


# --------------------------------------------------------------------------
# Debian Reference (zh-CN)
# --------------------------------------------------------------------------

def debref_skip(tag, a):
    cls = a.get("class") or ""
    if tag in {"head", "script", "style", "table"}:
        return True
    return tag == "div" and cls in {"navheader", "navfooter", "toc", "list-of-tables", "table",
                                    "informaltable", "titlepage-legalnotice", "legalnotice"}


def debian_reference(root: str, records) -> list[Doc]:
    base = os.path.join(root, "usr", "share", "debian-reference")
    src = "debian-reference-zh-cn"
    docs = []
    for path in sorted(glob.glob(os.path.join(base, "*.zh-cn.html"))):
        name = os.path.basename(path)
        if name.startswith("index"):
            continue
        # one document per section (h2), cut later if too long
        sections: list[list] = [[]]
        for tag, ident, text in html_blocks(path, debref_skip):
            if tag in {"h1", "h2"} and sections[-1]:
                sections.append([])
            if tag == "pre":
                text = clean_text(text, verbatim=True)
            else:
                text = clean_text(text)
            if text:
                sections[-1].append((tag, ident, text))
        for i, sec in enumerate(sections):
            text = clean_text(blocks_to_text(sec), verbatim=True)
            if len(text) >= 200 and cjk_ratio(text) > 0.15:
                docs.append(Doc(f"{src}:{name}#{i:03d}", src, "zh", text))
    return docs


# --------------------------------------------------------------------------
# Python documentation (reST sources, lightly cleaned)
# --------------------------------------------------------------------------

DROP_DIRECTIVES = {"index", "highlight", "sectionauthor", "moduleauthor", "toctree", "testsetup",
                   "testcleanup", "only", "include", "literalinclude", "image", "figure", "raw",
                   "tabularcolumns", "audit-event", "audit-event-table", "c:namespace", "module",
                   "currentmodule", "program", "rubric", "productionlist", "opcode",
                   "pdbcommand", "availability", "impl-detail", "csv-table", "list-table",
                   "table", "contents", "sidebar", "doctest-skip", "extension", "limited-api-list",
                   "miscnews", "option"}
LABELS = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "tip": "Tip:",
          "important": "Important:", "caution": "Caution:", "attention": "Attention:",
          "hint": "Hint:", "danger": "Danger:", "topic": "", "admonition": ""}
CODE_DIRECTIVES = {"code-block", "sourcecode", "doctest", "testcode", "testoutput", "code",
                   "parsed-literal"}

ROLE_RE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`((?:[^`\\]|\\.)+)`")
LINK_RE = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
REF_RE = re.compile(r"(?<![\w`])`([^`]+)`__?(?!\w)")


def rst_role(m: re.Match) -> str:
    inner = m.group(1)
    t = re.match(r"^(.*?)\s*<[^<>]*>$", inner, re.S)
    if t and t.group(1):
        inner = t.group(1)
    if inner.startswith("~"):
        inner = inner[1:].split(".")[-1]
    inner = inner.lstrip("!")
    return "`" + inner + "`"


def rst_inline(line: str) -> str:
    line = LINK_RE.sub(r"\1", line)
    line = REF_RE.sub(r"\1", line)
    line = re.sub(r":pep:`(\d+)`", r"PEP \1", line)
    line = re.sub(r":rfc:`(\d+)`", r"RFC \1", line)
    line = ROLE_RE.sub(rst_role, line)
    line = re.sub(r"``([^`]+)``", r"`\1`", line)
    line = re.sub(r"\s*\[#\w*\]_", "", line)
    line = re.sub(r"\|(\w+)\|", r"\1", line)
    return line


def rst_to_text(src: str) -> str:
    lines = src.expandtabs(8).split("\n")
    out: list[str] = []
    i = 0
    n = len(lines)

    def block_end(start: int, indent: int) -> int:
        j = start
        while j < n and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        return j

    while i < n:
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        m = re.match(r"^\.\.\s+([\w:-]+)::\s*(.*)$", stripped)
        if m:
            name, arg = m.group(1), m.group(2)
            end = block_end(i + 1, indent)
            # directive options (":noindex:" ...) directly under the directive
            j = i + 1
            while j < end and re.match(r"^\s*:[\w -]+:", lines[j]) and lines[j].strip():
                j += 1
            if name in DROP_DIRECTIVES:
                i = end
                continue
            pad = " " * indent
            if name in LABELS:
                head = LABELS[name] + (" " + rst_inline(arg) if arg else "")
                if head.strip():
                    out.append(pad + head.strip())
            elif name == "versionadded":
                out.append(pad + f"New in version {arg.split()[0] if arg else ''}".rstrip() + "."
                           + (" " + rst_inline(" ".join(arg.split()[1:])) if len(arg.split()) > 1 else ""))
            elif name == "versionchanged":
                out.append(pad + f"Changed in version {arg.split()[0] if arg else ''}:".strip()
                           + (" " + rst_inline(" ".join(arg.split()[1:])) if len(arg.split()) > 1 else ""))
            elif name in {"deprecated", "deprecated-removed"}:
                out.append(pad + f"Deprecated since version {arg.split()[0] if arg else ''}:")
            elif name in CODE_DIRECTIVES:
                pass
            else:  # function, class, method, data, attribute, exception, describe, ...
                if arg:
                    out.append(pad + arg)
                    # continuation signature lines (backslash)
            i = j
            continue
        if stripped.startswith(".. ") or stripped == "..":
            # comments, hyperlink targets, substitution definitions, footnotes
            i = block_end(i + 1, indent)
            continue
        if stripped and re.fullmatch(r"([=\-~^*#+'\"`:._])\1{2,}", stripped):
            i += 1          # section over/underlines
            continue
        if stripped == "::":
            i += 1
            continue
        if stripped.endswith("::"):
            line = line.rstrip()
            line = line[:-3] if line.endswith(" ::") else line[:-1]
        out.append(rst_inline(line) if stripped else "")
        i += 1
    text = "\n".join(out)
    # roles and links whose text runs over a line break
    text = LINK_RE.sub(lambda m: re.sub(r"\s+", " ", m.group(1)), text)
    text = ROLE_RE.sub(rst_role, text)
    return clean_text(text, verbatim=True)


# tiers of the Python documentation: the first is taken whole, the next in a hashed order
PYDOC_TIERS = {"tutorial": 0, "glossary": 0, "faq": 0, "howto": 1, "library": 1, "reference": 1,
               "using": 2, "extending": 2, "whatsnew": 2}


def python_docs(root: str, records) -> list[Doc]:
    base = os.path.join(root, "usr", "share", "doc", "python3.11", "html", "_sources")
    src = "python3.11-doc"
    docs = []
    for path in sorted(glob.glob(os.path.join(base, "**", "*.rst.txt"), recursive=True)):
        rel = os.path.relpath(path, base)[: -len(".txt")]
        top = rel.split("/")[0] if "/" in rel else rel[: -len(".rst")]
        if top not in PYDOC_TIERS:
            continue
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        if rel == "glossary.rst":
            records["glossary"] = parse_glossary(raw)
        text = rst_to_text(raw)
        if len(text) < 300:
            continue
        docs.append(Doc(f"{src}:{rel}", src, "en", text))
    return docs


def parse_glossary(raw: str) -> list[dict]:
    lines = raw.split("\n")
    entries = []
    i = lines.index(".. glossary::") + 1
    cur = None
    for line in lines[i:]:
        if re.match(r"^   \S", line):
            if cur:
                entries.append(cur)
            cur = {"term": line.strip(), "body": []}
        elif cur is not None:
            cur["body"].append(line)
    if cur:
        entries.append(cur)
    out = []
    for e in entries:
        body = "\n".join(e["body"])
        first = body.strip("\n").split("\n\n")[0]
        if "::" in first or re.search(r"^\s*[*-] ", first, re.M):
            continue
        para = re.sub(r"\s+", " ", rst_inline(first)).strip()
        term = rst_inline(e["term"]).strip("`")
        if 40 <= len(para) <= 420 and term:
            out.append({"term": term, "definition": para})
    return out


# --------------------------------------------------------------------------
# King James Bible (decoded with the bible-kjv tool)
# --------------------------------------------------------------------------

KJV_BOOKS = ["Genesis", "Ruth", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
             "Jonah", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "James"]
BOOK_ABBR = {"Ge": "Genesis", "Ru": "Ruth", "Psa": "Psalms", "Pr": "Proverbs",
             "Ec": "Ecclesiastes", "Song": "Song of Solomon", "Jon": "Jonah",
             "Mt": "Matthew", "Mr": "Mark", "Lu": "Luke", "Joh": "John", "Ac": "Acts",
             "Ro": "Romans", "Jas": "James"}


def kjv(root_text: str, root_tool: str, records) -> list[Doc]:
    tool = os.path.join(root_tool, "usr", "bin", "bible")
    data = os.path.join(root_text, "usr", "lib")
    out = subprocess.run([tool, "-f", "-p", data, "gen1:1-rev22:21"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, check=True).stdout.decode("utf-8")
    chapters: dict[tuple[str, int], list[tuple[int, str]]] = OrderedDict()
    book_of = {}
    for line in out.split("\n"):
        m = re.match(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        abbr, c, v, t = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()
        book_of.setdefault(abbr, len(book_of))
        chapters.setdefault((abbr, c), []).append((v, t))
    abbrs = list(book_of)
    if len(abbrs) != 66:
        sys.exit(f"bible: expected 66 books, got {len(abbrs)}")
    src = "bible-kjv-text"
    docs = []
    verses = []
    for (abbr, c), vs in chapters.items():
        book = BOOK_ABBR.get(abbr)
        if book is None:
            continue
        text = f"{book} {c}\n\n" + "\n".join(f"{v} {t}" for v, t in vs)
        key = f"{src}:{book}#{c:03d}"
        docs.append(Doc(key, src, "en", clean_text(text)))
        for v, t in vs:
            verses.append({"book": book, "chapter": c, "verse": v, "text": t, "key": key})
    records["verses"] = verses
    return docs


# --------------------------------------------------------------------------
# The Jargon File
# --------------------------------------------------------------------------

def unwrap(par: str) -> str:
    return re.sub(r"\s*\n\s*", " ", par).strip()


def jargon(root: str, records) -> list[Doc]:
    with gzip.open(os.path.join(root, "usr", "share", "doc", "jargon-text", "jargon.txt.gz"),
                   "rt", encoding="utf-8") as f:
        raw = f.read()
    src = "jargon-text"
    start = raw.index("\n   :(TM):")
    body = raw[start:]
    end = body.find("Appendix A. Hacker Folklore")
    if end > 0:
        body = body[:end]
    entries = re.split(r"\n(?=   :[^\n]+?:)", body)
    items = []
    defs = []
    for e in entries:
        e = e.strip("\n")
        m = re.match(r"^   :(.+?):(.*)$", e.split("\n")[0])
        if not m:
            continue
        term, gram = m.group(1).strip(), m.group(2).strip()
        pars = [unwrap(p) for p in re.split(r"\n\s*\n", "\n".join(e.split("\n")[1:])) if p.strip()]
        pars = [re.sub(r"\{([^{}]+)\}", r"\1", p) for p in pars]
        if not pars:
            continue
        head = term + (" " + gram if gram and gram != "//" else "")
        items.append(clean_text(head + "\n" + "\n\n".join(pars)))
        first = re.sub(r"^\[[^\]]*\]\s*", "", pars[0])
        if 60 <= len(first) <= 420 and re.match(r"^[A-Za-z]", term) and not first.startswith("See"):
            defs.append({"term": term, "definition": first})
    docs = []
    for i, group in enumerate(pack_items(items, 6000)):
        docs.append(Doc(f"{src}:lexicon#{i:04d}", src, "en", "\n\n".join(group)))
    records["jargon"] = defs
    return docs


# --------------------------------------------------------------------------
# CPython standard library
# --------------------------------------------------------------------------

STDLIB_SKIP = re.compile(r"(^|/)(test|tests|idlelib|turtledemo|lib2to3/tests|encodings|"
                         r"pydoc_data|__phello__|ensurepip|site-packages|dist-packages|"
                         r"lib-dynload|config-3)(/|$)|^_sysconfigdata|^__hello__")


def stdlib(root: str, records) -> list[Doc]:
    base = os.path.join(root, "usr", "lib", "python3.11")
    src = "libpython3.11-stdlib"
    docs = []
    funcs = []
    for path in sorted(glob.glob(os.path.join(base, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, base)
        if STDLIB_SKIP.search(rel):
            continue
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        text = clean_text(raw, verbatim=True)
        if len(text) < 200:
            continue
        key = f"{src}:{rel}"
        docs.append(Doc(key, src, "code", text, code=True))
        mod = rel[:-3].replace("/", ".")
        if mod.endswith(".__init__"):
            mod = mod[: -len(".__init__")]
        if any(part.startswith("_") for part in mod.split(".")):
            continue
        try:
            tree = ast.parse(raw)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = unwrap(doc.strip().split("\n\n")[0])
            if not (40 <= len(first) <= 400) or ">>>" in first:
                continue
            sig = ast.unparse(node.args)
            funcs.append({"module": mod, "name": node.name, "doc": first, "sig": sig, "key": key})
    records["functions"] = funcs
    return docs


# --------------------------------------------------------------------------
# Selection, chunking, splitting
# --------------------------------------------------------------------------

def priority(doc: Doc) -> tuple:
    """Order in which a source's documents are taken until its budget is spent."""
    s, k = doc.source, doc.key
    if s == "python3.11-doc":
        rel = k.split(":", 1)[1]
        top = rel.split("/")[0] if "/" in rel else rel[: -len(".rst")]
        return (PYDOC_TIERS[top], hkey(k))
    if s == "chinese-poetry":
        # classics and anthologies first, then the rest in a hashed order
        coll = k.split(":", 1)[1].split("#")[0]
        first = ["shijing", "songci300", "shuimotangshi", "lunyu", "chuci", "caocao",
                 "nalanxingde", "youmengying"]
        return (first.index(coll) if coll in first else len(first), hkey(k))
    if s == "bible-kjv-text":
        book = k.split(":", 1)[1].split("#")[0]
        return (KJV_BOOKS.index(book), k)
    if s == "jargon-text":
        return (0, k)
    if s == "fortunes-zh":
        return (0, k)
    if s.startswith("libreoffice-help-"):
        return (0, hkey(split_key(k)))
    return (0, hkey(k))


def split_key(doc_key: str) -> str:
    """The key deciding a document's split and order: a LibreOffice page has the
    same one in both languages, so both go to the same split."""
    src, rest = doc_key.split(":", 1)
    if src.startswith("libreoffice-help-"):
        return "libreoffice-help:" + rest
    return doc_key


def select(docs: list[Doc]) -> list[Doc]:
    by_src = defaultdict(list)
    for d in docs:
        by_src[d.source].append(d)
    chosen = []
    for src, budget in BUDGETS.items():
        used = 0
        for d in sorted(by_src.get(src, []), key=priority):
            if used >= budget:
                break
            chosen.append(d)
            used += len(d.text)
    return chosen


def is_valid(doc_key: str, piece: int) -> bool:
    """Whether piece `piece` of a document goes to the held-out split."""
    return hkey(f"valid:{split_key(doc_key)}#{piece}") % 1000 < VALID_PER_MILLE


def make_records(docs: list[Doc]) -> tuple[list[dict], list[dict], set[str]]:
    """Cut the documents into pieces, drop exact duplicates, split train/valid.
    Returns the two lists of records and the keys of the documents with a piece
    in valid (the chat set uses none of these)."""
    seen = set()
    train, valid = [], []
    valid_keys = set()
    for d in sorted(docs, key=lambda d: d.key):
        for i, part in enumerate(split_paragraphs_limited(d.text, MAX_DOC_CHARS, code=d.code)):
            part = part.strip("\n")
            if len(part) < 50:
                continue
            h = sha(part)
            if h in seen:
                continue
            seen.add(h)
            rec = {"text": part, "source": d.key, "lang": d.lang}
            if is_valid(d.key, i):
                valid.append(rec)
                valid_keys.add(d.key)
            else:
                train.append(rec)
    # a stable, mixed order: by a hash of the text
    train.sort(key=lambda r: sha("order:" + r["text"]))
    valid.sort(key=lambda r: sha("order:" + r["text"]))
    return train, valid, valid_keys


def write_jsonl_gz(path: str, records: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        for r in records:
            g.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    with open(path, "wb") as f:
        f.write(buf.getvalue())


# --------------------------------------------------------------------------
# The SFT conversation set
# --------------------------------------------------------------------------

MAX_EXCHANGE = 600

INSTR_TRANSLATE = "You are a careful translator between Chinese and English."
INSTR_POETRY = "你是一位熟悉中国古典诗词的助手。"
INSTR_PYTHON = "You are a helpful assistant who knows the Python standard library well."


def conv(cid: str, turns: list[tuple[str, str]], instruction: str = "") -> dict | None:
    convs = []
    for h, g in turns:
        convs.append({"from": "human", "value": h.strip()})
        convs.append({"from": "gpt", "value": g.strip()})
    total = sum(len(c["value"]) for c in convs) + len(instruction)
    if total > MAX_EXCHANGE or any(not c["value"] for c in convs):
        return None
    return {"id": cid, "conversations": convs, "instruction": instruction}


def take(items: list, n: int, salt: str) -> list:
    return sorted(items, key=lambda x: hkey(salt + json.dumps(x, ensure_ascii=False, sort_keys=True)))[:n]


def build_chat(rec: dict, valid_keys: set[str], train_keys: set[str]) -> list[dict]:
    """Every exchange is derived mechanically from documents of the training split."""
    out: list[dict] = []

    def ok(key: str) -> bool:
        return key in train_keys and key not in valid_keys

    # 1. translations of LibreOffice help paragraphs paired by page and paragraph id
    pairs = [p for p in rec["lo_pairs"] if ok(p["key_zh"]) and ok(p["key_en"])]
    uniq = {}
    for p in pairs:
        uniq.setdefault(p["en"], p)
    pairs = list(uniq.values())
    singles = take(pairs, 220, "lo")
    n = 0
    for idx, p in enumerate(singles[:160]):
        if idx % 2 == 0:
            c = conv(f"lo-en2zh-{n:04d}", [("Translate into Chinese:\n" + p["en"], p["zh"])],
                     INSTR_TRANSLATE if idx % 4 == 0 else "")
        else:
            c = conv(f"lo-zh2en-{n:04d}", [("请把下面这段话翻译成英文：\n" + p["zh"], p["en"])],
                     INSTR_TRANSLATE if idx % 4 == 1 else "")
        if c:
            out.append(c)
            n += 1
    # multi-turn: two paragraphs of the same page
    by_page = defaultdict(list)
    for p in pairs:
        by_page[p["page"]].append(p)
    multi = []
    for page in sorted(by_page):
        ps = sorted(by_page[page], key=lambda p: p["id"])
        if len(ps) >= 2:
            multi.append((page, ps[0], ps[1]))
    n = 0
    for idx, (_, a, b) in enumerate(take([list(m) for m in multi], 60, "lo-multi")):
        if idx % 2 == 0:
            turns = [("Translate into Chinese:\n" + a["en"], a["zh"]),
                     ("And this one:\n" + b["en"], b["zh"])]
        else:
            turns = [("把这句话翻译成英文：\n" + a["zh"], a["en"]),
                     ("再翻译这一句：\n" + b["zh"], b["en"])]
        c = conv(f"lo-multi-{n:04d}", turns, INSTR_TRANSLATE if idx % 3 == 0 else "")
        if c:
            out.append(c)
            n += 1
        if n >= 40:
            break

    # 2. poems: recite by title, author of a title, where a Shijing poem is from
    poems = [p for p in rec["poems"] if ok(p["key"])]
    count = Counter((p["collection"], p["title"]) for p in poems)
    poems = [p for p in poems if count[(p["collection"], p["title"])] == 1 and p["title"]]
    n = 0
    for idx, p in enumerate(take(poems, 400, "poems")):
        body = "\n".join(line.strip() for line in p["lines"] if line.strip())
        title = p["title"]
        coll = p["collection"]
        if coll == "诗经":
            turns = [(f"《{title}》出自《诗经》的哪一部分？", f"《{title}》出自《诗经·{p['where']}》。"),
                     (f"请写出《{title}》的全文。", body)]
        elif idx % 3 == 0:
            turns = [(f"请背诵{p['author']}的《{title}》。", body)]
        elif idx % 3 == 1:
            turns = [(f"《{title}》的作者是谁？", f"《{title}》的作者是{p['author']}。")]
        else:
            turns = [(f"《{title}》的作者是谁？", f"《{title}》的作者是{p['author']}。"),
                     ("请写出这首作品的全文。", body)]
        if len(turns) == 2 and idx % 5 == 0:
            turns = turns[:1]
        c = conv(f"poem-{n:04d}", turns, INSTR_POETRY if idx % 3 == 2 else "")
        if c:
            out.append(c)
            n += 1
        if n >= 130:
            break

    # 3. standard-library functions: what does it do, and its signature
    funcs = [f for f in rec["functions"] if ok(f["key"])]
    n = 0
    for idx, f in enumerate(take(funcs, 300, "funcs")):
        q = f"What does the function `{f['name']}` in module `{f['module']}` do?"
        turns = [(q, f["doc"])]
        if idx % 3 == 0:
            turns.append(("What is its signature?", f"`{f['module']}.{f['name']}({f['sig']})`"))
        c = conv(f"stdlib-{n:04d}", turns, INSTR_PYTHON if idx % 4 == 1 else "")
        if c:
            out.append(c)
            n += 1
        if n >= 90:
            break

    # 4. Python glossary terms
    if ok("python3.11-doc:glossary.rst"):
        n = 0
        for idx, g in enumerate(take(rec.get("glossary", []), 80, "glossary")):
            c = conv(f"glossary-{n:04d}", [(f"In Python, what does the term “{g['term']}” mean?",
                                            g["definition"])],
                     INSTR_PYTHON if idx % 4 == 0 else "")
            if c:
                out.append(c)
                n += 1
            if n >= 40:
                break

    # 5. Jargon File definitions
    jdefs = [d for d in rec["jargon"]]
    jkeys = sorted(k for k in train_keys if k.startswith("jargon-text:"))
    if jkeys:
        n = 0
        for d in take(jdefs, 80, "jargon"):
            c = conv(f"jargon-{n:04d}", [(f"What does the hacker slang term “{d['term']}” mean?",
                                          d["definition"])])
            if c:
                out.append(c)
                n += 1
            if n >= 40:
                break

    # 6. Bible verses (KJV): quote a verse, then the next one
    verses = [v for v in rec["verses"] if ok(v["key"])]
    index = {(v["book"], v["chapter"], v["verse"]): v for v in verses}
    n = 0
    for idx, v in enumerate(take(verses, 200, "verses")):
        ref = f"{v['book']} {v['chapter']}:{v['verse']}"
        turns = [(f"Quote {ref} from the King James Version.", v["text"])]
        nxt = index.get((v["book"], v["chapter"], v["verse"] + 1))
        if nxt and idx % 2 == 0:
            turns.append(("And the next verse?", nxt["text"]))
        c = conv(f"kjv-{n:04d}", turns)
        if c:
            out.append(c)
            n += 1
        if n >= 40:
            break

    out.sort(key=lambda c: sha("chat:" + c["id"]))
    return out


# --------------------------------------------------------------------------
# NOTICE.md
# --------------------------------------------------------------------------

def notice(fetched: dict, stats: dict, chat_stats: Counter) -> str:
    L = []
    L.append("# Demo corpus: sources and licences\n")
    L.append("Built by `scripts/build_demo_corpus.py` (run `python scripts/build_demo_corpus.py "
             "--out aquila/data/demo`); every file here is generated by it, this one included.\n")
    L.append("The text was taken from the following packages, fetched with the registries' "
             "own clients (`apt-get download NAME=VERSION` from " + DEBIAN_RELEASE +
             "; `npm pack NAME@VERSION`) and unpacked, never installed. Each keeps its own licence; "
             "the licence of this repository's code does not apply to them. The `source` field of "
             "every record names the package and the file (`package:path#part`) it comes from.\n")
    L.append("| package | registry | version | licence | used for | archive sha256 |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for name, (ver, lic, use) in DEB_PINS.items():
        L.append(f"| {name} | Debian | {ver} | {lic} | {use} | `{fetched[name]['sha256'][:16]}…` |")
    for name, (ver, lic, use) in NPM_PINS.items():
        L.append(f"| {name} | npm | {ver} | {lic} | {use} | `{fetched[name]['sha256'][:16]}…` |")
    L.append("")
    L.append("libpython3.11-stdlib and bible-kjv are built per architecture (amd64 was used); "
             "the text taken from them is the same on every architecture. The full texts of the "
             "licences: MPL-2.0, GPL-2, GPL-3 and Apache-2.0 in Debian's "
             "`/usr/share/common-licenses/`, or at the licences' home pages; the PSF licence in "
             "CPython's `LICENSE` (`usr/lib/python3.11/LICENSE.txt` of libpython3.11-stdlib) and "
             "in the documentation's `license.rst`; MIT in the chinese-poetry package's `LICENSE` "
             "(Copyright (c) 2016 JackeyGao).\n")
    L.append("## What was taken and how it was cleaned\n")
    L.append("- **chinese-poetry** (zh): only collections in simplified characters: 诗经, 楚辞, 论语, "
             "宋词三百首 and 全宋词 (duplicates of the 300 removed), 元曲, 曹操诗集, 纳兰性德诗集, "
             "水墨唐诗 (with its modern-Chinese explanations), 幽梦影. The package's 全唐诗/全宋诗 and "
             "四书 are in traditional characters and were not used. Poems are written as "
             "`《title》`, `作者：author`, then one line per verse line; consecutive poems are "
             "grouped into documents of up to 3,000 characters.")
    L.append("- **fortunes-zh** (zh): the `tang300` and `song100` fortune files only (simplified "
             "characters); terminal colour codes removed.")
    L.append("- **libreoffice-help-zh-cn / libreoffice-help-en-us** (zh / en): pages present in both "
             "languages; the page body only (no navigation, \"to access this command\" boxes, "
             "related-topic links, debug footer); HTML turned into plain paragraphs, list items "
             "as `- ` lines; paragraphs that repeat on more than three pages dropped as "
             "boilerplate; in the Chinese pages, paragraphs left untranslated (no Chinese "
             "character) dropped. One document per page.")
    L.append("- **debian-reference-zh-cn** (zh): the HTML chapters, one document per section; "
             "tables, tables of contents and navigation dropped; `<pre>` blocks kept verbatim.")
    L.append("- **python3.11-doc** (en): the reStructuredText sources (`_sources/`): tutorial, "
             "glossary and FAQ first, then HOWTOs, library and language reference pages in a "
             "hashed order; markup lightly removed (roles and links to their text, `index`/"
             "`toctree`/... directives and comments dropped, admonitions and version notes as "
             "plain sentences, section underlines dropped, code blocks kept).")
    L.append("- **bible-kjv-text** (en): decoded with the `bible` program of bible-kjv "
             "(`bible -f -p DIR gen1:1-rev22:21`); the books of " + ", ".join(KJV_BOOKS) +
             " in this order until the budget is spent; one document per chapter, one verse "
             "per line.")
    L.append("- **jargon-text** (en): the lexicon entries of the Jargon File 4.4.7, "
             "hard-wrapped lines joined, `{cross references}` reduced to their text; entries "
             "grouped into documents of up to 6,000 characters.")
    L.append("- **libpython3.11-stdlib** (code): the pure-Python modules under "
             "`usr/lib/python3.11`, less tests, idlelib, turtledemo, encodings tables and "
             "pydoc_data, taken in a hashed order of their paths; files kept verbatim (tabs "
             "expanded, trailing spaces removed).")
    L.append("")
    L.append("All text: Unicode NFC, control characters removed, trailing white space removed, "
             "at most one blank line in a row; prose has runs of spaces collapsed. Documents "
             f"longer than {MAX_DOC_CHARS:,} characters are cut at paragraph boundaries (code: "
             "preferably before an unindented line); pieces shorter than 50 characters and exact "
             "duplicates are dropped. Each source's documents are taken in the order above "
             "until its character budget is spent.\n")
    L.append("## Splits\n")
    L.append(f"A record (a document, or the i-th piece of a long one) goes to `valid.jsonl.gz` "
             f"when the first 64 bits of SHA-256(\"valid:<key>#<i>\") modulo 1000 are below "
             f"{VALID_PER_MILLE}, so about {VALID_PER_MILLE / 10:g}% of records, stable under "
             "rebuilds; the key of a LibreOffice page is the same in both languages, so the two "
             "versions of a page fall in the same split. Records are ordered by SHA-256 of their "
             "text.\n")
    L.append("| split | lang | documents | characters | UTF-8 bytes |")
    L.append("| --- | --- | ---: | ---: | ---: |")
    for split in ("train", "valid"):
        for lang in ("zh", "en", "code"):
            s = stats[split][lang]
            L.append(f"| {split} | {lang} | {s['docs']:,} | {s['chars']:,} | {s['bytes']:,} |")
    tot = stats["all"]
    L.append("")
    L.append("Shares of all characters (train + valid): " + ", ".join(
        f"{lang} {100 * tot[lang]['chars'] / tot['chars']:.1f}%" for lang in ("zh", "en", "code"))
        + "; of UTF-8 bytes: " + ", ".join(
        f"{lang} {100 * tot[lang]['bytes'] / tot['bytes']:.1f}%" for lang in ("zh", "en", "code"))
        + ".\n")
    L.append("## chat.jsonl\n")
    L.append("FlagAI's SFT format, one conversation a line: `id`, `conversations` (alternating "
             "`human`/`gpt` turns, starting with `human`), `instruction` (system text, empty "
             "when none). Every exchange is derived mechanically from documents of the training "
             f"split (none from `valid`), and kept only if all its texts together (instruction "
             f"included) are at most {MAX_EXCHANGE} characters:\n")
    L.append(f"- `lo-en2zh-*`, `lo-zh2en-*` ({chat_stats['lo-single']}): a paragraph of a LibreOffice help "
             "page in one language and the paragraph with the same page path and paragraph id "
             "in the other: \"Translate into Chinese:\\n<en>\" → <zh>, or "
             "\"请把下面这段话翻译成英文：\\n<zh>\" → <en>. Paragraphs of 25-220 English "
             "characters whose Chinese side is mostly Chinese characters.")
    L.append(f"- `lo-multi-*` ({chat_stats['lo-multi']}): two such paragraphs of the same page, "
             "one asked after the other (\"And this one:\" / \"再翻译这一句：\").")
    L.append(f"- `poem-*` ({chat_stats['poem']}): poems with a title unique in their collection "
             "(唐诗三百首 from fortunes-zh, 宋词三百首, 水墨唐诗 and 诗经 from chinese-poetry): "
             "\"请背诵<author>的《title》。\" → the poem; \"《title》的作者是谁？\" → "
             "\"《title》的作者是<author>。\", sometimes followed by \"请写出这首作品的全文。\" → the poem; "
             "for the 诗经, \"《title》出自《诗经》的哪一部分？\" → its section, then its text.")
    L.append(f"- `stdlib-*` ({chat_stats['stdlib']}): public top-level functions of the standard-"
             "library modules in the corpus: \"What does the function `name` in module `m` do?\" → "
             "the first paragraph of its docstring (lines joined); a third of them go on with "
             "\"What is its signature?\" → `` `m.name(args)` `` (the parameters as written in the "
             "source).")
    L.append(f"- `glossary-*` ({chat_stats['glossary']}): entries of the Python glossary "
             "(`glossary.rst`) whose first paragraph is plain prose: \"In Python, what does the "
             "term “X” mean?\" → that paragraph, markup removed.")
    L.append(f"- `jargon-*` ({chat_stats['jargon']}): Jargon File entries: \"What does the hacker "
             "slang term “X” mean?\" → the first paragraph of the entry (a leading [usage] tag "
             "removed).")
    L.append(f"- `kjv-*` ({chat_stats['kjv']}): \"Quote <Book> <c>:<v> from the King James "
             "Version.\" → the verse; half of them go on with \"And the next verse?\" → the next "
             "verse.")
    L.append("")
    L.append("Which items are used is decided by a hash of the item; a fixed share of each kind "
             f"carries an instruction (\"{INSTR_TRANSLATE}\", \"{INSTR_POETRY}\", "
             f"\"{INSTR_PYTHON}\"). Conversations are ordered by a hash of their id. "
             f"Total: {chat_stats['total']} conversations, {chat_stats['multi']} of them with two "
             f"human turns, {chat_stats['instr']} with an instruction.\n")
    return "\n".join(L)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (aquila/data/demo)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                    "aquila-demo-corpus"),
                    help="where the packages are downloaded and unpacked")
    ap.add_argument("--offline", action="store_true", help="use only what is in --cache")
    args = ap.parse_args(argv)

    fetched = fetch(args.cache, args.offline)
    x = {name: info["dir"] for name, info in fetched.items()}
    rec: dict = {}
    docs: list[Doc] = []
    print("reading sources ...", file=sys.stderr)
    docs += chinese_poetry(x["chinese-poetry"], rec)
    docs += fortunes_zh(x["fortunes-zh"], rec)
    lo_zh = libreoffice_pages(x["libreoffice-help-zh-cn"], "zh-CN")
    lo_en = libreoffice_pages(x["libreoffice-help-en-us"], "en-US")
    zh, en = libreoffice_docs(lo_zh, lo_en, rec)
    # the English pages are taken in the same (hashed) order as the Chinese ones,
    # so the two languages cover mostly the same pages
    docs += zh + en
    docs += debian_reference(x["debian-reference-zh-cn"], rec)
    docs += python_docs(x["python3.11-doc"], rec)
    docs += kjv(x["bible-kjv-text"], x["bible-kjv"], rec)
    docs += jargon(x["jargon-text"], rec)
    docs += stdlib(x["libpython3.11-stdlib"], rec)
    for d in docs:
        assert SOURCE_LANG[d.source] == d.lang, d.key

    chosen = select(docs)
    train, valid, valid_keys = make_records(chosen)
    train_keys = {d.key for d in chosen} - valid_keys
    chat = build_chat(rec, valid_keys, train_keys)

    os.makedirs(args.out, exist_ok=True)
    write_jsonl_gz(os.path.join(args.out, "train.jsonl.gz"), train)
    write_jsonl_gz(os.path.join(args.out, "valid.jsonl.gz"), valid)
    with open(os.path.join(args.out, "chat.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for c in chat:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")

    # statistics
    def zero():
        return {"docs": 0, "chars": 0, "bytes": 0}
    stats = {"train": defaultdict(zero), "valid": defaultdict(zero), "all": defaultdict(zero)}
    for split, rs in (("train", train), ("valid", valid)):
        for r in rs:
            for s in (stats[split][r["lang"]], stats["all"][r["lang"]]):
                s["docs"] += 1
                s["chars"] += len(r["text"])
                s["bytes"] += len(r["text"].encode("utf-8"))
    stats["all"]["chars"] = sum(stats["all"][lang]["chars"] for lang in ("zh", "en", "code"))
    stats["all"]["bytes"] = sum(stats["all"][lang]["bytes"] for lang in ("zh", "en", "code"))
    cs = Counter()
    for c in chat:
        kind = c["id"].rsplit("-", 1)[0]
        kind = {"lo-en2zh": "lo-single", "lo-zh2en": "lo-single"}.get(kind, kind)
        cs[kind] += 1
        cs["total"] += 1
        cs["multi"] += len(c["conversations"]) > 2
        cs["instr"] += bool(c["instruction"])
    with open(os.path.join(args.out, "NOTICE.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(notice(fetched, stats, cs))

    tot = stats["all"]
    print(f"{'split':6} {'lang':5} {'docs':>7} {'chars':>11} {'bytes':>11}")
    for split in ("train", "valid"):
        for lang in ("zh", "en", "code"):
            s = stats[split][lang]
            print(f"{split:6} {lang:5} {s['docs']:7d} {s['chars']:11,d} {s['bytes']:11,d}")
    for lang in ("zh", "en", "code"):
        print(f"share {lang:5} chars {100 * tot[lang]['chars'] / tot['chars']:5.1f}%   "
              f"bytes {100 * tot[lang]['bytes'] / tot['bytes']:5.1f}%")
    by_src = Counter()
    for r in train + valid:
        by_src[r["source"].split(":")[0]] += len(r["text"])
    for s, n in sorted(by_src.items()):
        print(f"source {s:28} {n:11,d} chars")
    total = 0
    for name in ("train.jsonl.gz", "valid.jsonl.gz", "chat.jsonl", "NOTICE.md"):
        size = os.path.getsize(os.path.join(args.out, name))
        total += size if name.endswith(".gz") else 0
        print(f"{name:16} {size:11,d} bytes")
    print(f"compressed corpus total {total:,d} bytes; chat: {cs['total']} conversations "
          f"({cs['multi']} multi-turn, {cs['instr']} with an instruction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
