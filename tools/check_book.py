"""Check the built HTML book: every toc page exists, nothing was left unrendered, every image exists.

    python tools/check_book.py _build/html
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UNRENDERED = [r"\{glue:", r"\{glue\}", r"\{cite(:\w+)?\}", r"\{doc\}", r"\{ref\}", r"\{numref\}",
              r"```\{", r":::\{", r"\{exercise\}", r"\{solution"]


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
        for pattern in UNRENDERED:
            if re.search(pattern, body):
                problems.append(f"{page.relative_to(html)}: unrendered markup matching {pattern!r}")
        for src in re.findall(r'<img[^>]+src="([^"]+)"', text):
            if src.startswith(("http://", "https://", "data:")):
                continue
            if not (page.parent / src.split("#")[0]).resolve().is_file():
                problems.append(f"{page.relative_to(html)}: image {src} does not exist")
    for problem in problems:
        print("book check:", problem)
    print(f"book check: {len(toc_files(toc))} toc pages, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "_build/html"))
