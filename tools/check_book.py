"""Check the built HTML book: every toc page exists, nothing was left unrendered, every image exists, and
no page or stylesheet loads anything from the internet (tools/check_browser.py checks the same in a browser).

    python tools/check_book.py _build/html
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# A role left unrendered shows as ``{ref}`` before its target; the same letters inside TeX (``\\pi_\\text{ref}``,
# ``\\mathrm{ref}``, ``_{ref}``) are MathJax source, not a role: a role never follows a letter, ``_`` or ``^``.
ROLE = r"(?<![A-Za-z_^])"
UNRENDERED = [r"\{glue:", r"\{glue\}", ROLE + r"\{cite(:\w+)?\}", ROLE + r"\{doc\}", ROLE + r"\{ref\}",
              ROLE + r"\{numref\}", r"```\{", r":::\{", r"\{exercise\}", r"\{solution"]


def unrendered(body: str) -> list[str]:
    """The patterns of :data:`UNRENDERED` found in a page's text (scripts, code and pre removed)."""
    return [pattern for pattern in UNRENDERED if re.search(pattern, body)]
# What a browser fetches by itself: scripts, images, frames, media, stylesheets, icons, preloads, CSS url().
REMOTE_TAG = re.compile(r"<(script|img|iframe|source|video|audio|embed)\b[^>]*?\bsrc=[\"']((?:https?:)?//[^\"']+)", re.I)
REMOTE_LINK = re.compile(r"<link\b[^>]*?\bhref=[\"']((?:https?:)?//[^\"']+)[^>]*>", re.I)
FETCHED_LINK = re.compile(r"\brel=[\"'][^\"']*\b(stylesheet|icon|preload|modulepreload|manifest|prefetch)\b", re.I)
REMOTE_CSS = re.compile(r"(?:url\(\s*[\"']?|@import\s+[\"'])((?:https?:)?//[^\"')\s]+)", re.I)


def remote_assets(text: str, css: bool = False) -> list[str]:
    """URLs outside the book that a browser would fetch when it opens this HTML (or CSS) text."""
    if css:
        return REMOTE_CSS.findall(text)
    found = [url for _, url in REMOTE_TAG.findall(text)]
    found += [m.group(1) for m in REMOTE_LINK.finditer(text) if FETCHED_LINK.search(m.group(0))]
    return found + REMOTE_CSS.findall(" ".join(re.findall(r"<style.*?</style>|style=\"[^\"]*\"", text, re.S)))


def toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        if "root" in node:
            files.append(node["root"])
        for value in node.values():
            files += toc_files(value)
    elif isinstance(node, list):
        for item in node:
            files += toc_files(item)
    return files


def main(html_dir: str) -> int:
    html = Path(html_dir)
    problems = []
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    for name in toc_files(toc):
        page = html / (str(Path(name).with_suffix("")) + ".html")
        if not page.is_file():
            problems.append(f"toc page {name} was not built ({page})")
    for page in sorted(html.rglob("*.html")):
        if page.parts[len(html.parts)] in ("_static", "_sources", "_sphinx_design_static", "genindex.html"):
            continue
        text = page.read_text(encoding="utf-8")
        body = re.sub(r"<script.*?</script>|<pre.*?</pre>|<code.*?</code>", "", text, flags=re.S)
        for pattern in unrendered(body):
            problems.append(f"{page.relative_to(html)}: unrendered markup matching {pattern!r}")
        for url in remote_assets(text):
            problems.append(f"{page.relative_to(html)}: loads {url} from the internet")
        for src in re.findall(r'<img[^>]+src="([^"]+)"', text):
            if src.startswith(("http://", "https://", "data:")):
                continue
            if not (page.parent / src.split("#")[0]).resolve().is_file():
                problems.append(f"{page.relative_to(html)}: image {src} does not exist")
    for sheet in sorted(html.rglob("*.css")):
        for url in remote_assets(sheet.read_text(encoding="utf-8", errors="replace"), css=True):
            problems.append(f"{sheet.relative_to(html)}: loads {url} from the internet")
    for problem in problems:
        print("book check:", problem)
    print(f"book check: {len(toc_files(toc))} toc pages, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "_build/html"))
