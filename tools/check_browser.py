"""Check the built book as its readers get it: in headless Chromium, with the network cut off.

    python tools/check_browser.py _build/html [--screenshots _build/screenshots]

`_build/html` is served on 127.0.0.1 and every other host is unreachable from the browser (its DNS maps
every name to nothing and its proxy is a closed port). For every page of the toc it checks that

- the page loads with no console error and fetches nothing from outside 127.0.0.1, nor anything that
  answers 4xx/5xx;
- MathJax ran: every math element holds a rendered ``mjx-container``, no TeX error, and no raw TeX
  (``\\(``, ``\\[``, ``$$``, ``\\begin{``, ``\\command``) is left in the text outside code;
- every image has loaded (``naturalWidth > 0``);
- at a phone width (390 px) the page does not scroll sideways (code blocks scroll inside themselves);
- each section with a widget cell (ipywidgets) shows an image or a rendered widget, not nothing;

and that the Chinese search finds the chapter page for the issue's terms and for every glossary term
(book/notation.md) of a chapter that is in the book. One screenshot per page goes to
`_build/screenshots/` (desktop width; scrolled to the page's first display formula, if it has one).

Needs Debian's chromium and chromium-driver (`make browser` installs them when missing, as root) and the
Python package selenium (requirements.txt). The parsing helpers at the top are pure and unit-tested
(tests/test_notebook_hygiene.py).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_book import toc_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DESKTOP = (1280, 900)
PHONE = (390, 844)
# Issue 14's terms: the search must find these chapter pages.
REQUIRED_SEARCHES = {"成员推理": "01", "剪枝": "08", "对抗性后缀": "05"}
# Widget cells that have no static counterpart in the book yet (a figure of what the widget shows, or saved
# widget state). Strict: a listed page whose widget section now shows something fails, so that the entry
# is removed and the check guards it from then on.
WIDGETS_WITHOUT_STATIC: dict[str, str] = {}
# Glossary terms (book/notation.md) that their chapter never writes, so the search finds only the glossary.
# Strict like the widget list: an entry the search now finds fails until it is removed. Fix by using the
# term in the chapter's prose or by changing the glossary to the chapter's wording.
GLOSSARY_NOT_IN_CHAPTER: dict[str, str] = {}
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\[A-Za-z]{2,}")
WIDGET_CODE = re.compile(r"\bipywidgets\b|\binteract(?:ive)?\(")
LOCAL_SCHEMES = ("data:", "blob:", "about:", "chrome:", "chrome-extension:", "devtools:")


# --- pure helpers -------------------------------------------------------------------------------------

def glossary_terms(notation: str) -> list[tuple[str, str]]:
    """(Chinese term, chapter "NN") for every row of the glossary table in book/notation.md.

    A cell such as ``剪枝 / 稀疏化`` gives two terms; a parenthesis (``金丝雀（植入的秘密）``) is dropped.
    """
    terms = []
    for cell, chapter in re.findall(r"^\|\s*([^|]+?)\s*\|[^|\n]+\|\s*第 (\d\d) 章\s*\|\s*$", notation, re.M):
        for variant in cell.split("/"):
            variant = re.sub(r"（[^）]*）|\([^)]*\)", "", variant).strip()
            if variant:
                terms.append((variant, chapter))
    return terms


def search_words(notation: str) -> list[str]:
    """The Chinese words jieba must know for the glossary terms to be indexed whole (runs of CJK)."""
    words = []
    for term, _ in glossary_terms(notation):
        for word in re.findall(r"[\u4e00-\u9fff]+", term):
            if word not in words:
                words.append(word)
    return words


def chapter_pages(pages: list[str]) -> dict[str, str]:
    """Chapter number "NN" -> toc page (``notebooks/NN_topic``) for the chapters that are in the book."""
    chapters = {}
    for page in pages:
        match = re.match(r"(\d\d)_", Path(page).name)
        if match:
            chapters[match.group(1)] = str(Path(page).with_suffix(""))
    return chapters


def search_expectations(notation: str, pages: list[str]) -> dict[str, str]:
    """Search term -> the chapter page its results must include: the required terms, then the glossary's."""
    chapters = chapter_pages(pages)
    expected = {term: chapters[ch] for term, ch in REQUIRED_SEARCHES.items() if ch in chapters}
    for term, ch in glossary_terms(notation):
        if ch in chapters:
            expected.setdefault(term, chapters[ch])
    return expected


def raw_tex(text: str) -> list[str]:
    """TeX that MathJax should have turned into formulas, found in a page's visible non-code text."""
    found = []
    for match in RAW_TEX.finditer(text):
        start = max(match.start() - 30, 0)
        found.append(text[start:match.end() + 30].replace("\n", " "))
    return found


def docname(url: str, base: str) -> str:
    """``http://127.0.0.1:PORT/notebooks/05_gcg.html?highlight=x#id`` -> ``notebooks/05_gcg``."""
    path = urllib.parse.urlparse(urllib.parse.urljoin(base, url)).path.lstrip("/")
    return path[:-len(".html")] if path.endswith(".html") else path


def is_external(url: str, origin: str) -> bool:
    return not (url.startswith(origin) or url.startswith(LOCAL_SCHEMES))


# --- the browser --------------------------------------------------------------------------------------

PAGE_FACTS = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const r = {};
  // On a loaded machine the script can start before the page is parsed (document.body null): wait up to 20 s.
  for (let t = 0; !(document.body && document.readyState === 'complete') && t < 200; t++) {
    await new Promise(res => setTimeout(res, 100));
  }
  // MathJax loads deferred: give it up to 20 s to start on a page with math, then wait for its typesetting.
  for (let t = 0; document.querySelector('.math') && !(window.MathJax && MathJax.startup &&
       MathJax.startup.promise) && t < 200; t++) {
    await new Promise(res => setTimeout(res, 100));
  }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; } catch (e) { r.mathjaxError = String(e); }
  }
  r.mathjax = !!(window.MathJax && MathJax.version);
  const maths = [...document.querySelectorAll('.math')];
  r.math = maths.length;
  r.containers = document.querySelectorAll('mjx-container').length;
  r.unrendered = maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80));
  r.texErrors = [];
  if (r.mathjax && MathJax.startup.document && MathJax.startup.toMML) {
    // A TeX error, or an undefined macro (which MathJax shows as its name in red).
    for (const item of MathJax.startup.document.math) {
      const mml = MathJax.startup.toMML(item.root);
      if (/<merror|<mtext mathcolor="red">\\/.test(mml)) r.texErrors.push(String(item.math).slice(0, 80));
    }
  }
  const skip = 'pre, code, script, style, noscript, textarea, kbd, mjx-container, .highlight';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const texts = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!n.parentElement.closest(skip)) texts.push(n.nodeValue);
  }
  r.text = texts.join('\n');
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(res => {
    i.addEventListener('load', res); i.addEventListener('error', res); setTimeout(res, 10000);
  })));
  r.images = imgs.length;
  r.brokenImages = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const widgetCode = new RegExp(arguments[0]);
  r.widgets = [...document.querySelectorAll('div.cell')].filter(c => {
    const input = c.querySelector('.cell_input');
    return (input && widgetCode.test(input.textContent)) ||
      c.querySelector('script[type="application/vnd.jupyter.widget-view+json"]');
  }).map(c => {
    const section = c.closest('section') || document.body;
    const heading = section.querySelector('h1, h2, h3, h4, h5, h6');
    const shown = el => el.offsetWidth > 0 && el.offsetHeight > 0 && !el.closest('.cell_input');
    return {
      section: heading ? heading.textContent.replace(/#$/, '').trim() : '(no heading)',
      images: [...section.querySelectorAll('img')].filter(i => i.naturalWidth > 0 && shown(i)).length,
      widgets: [...section.querySelectorAll('.jupyter-widgets, .widget-container, .lm-Widget')]
        .filter(shown).length,
    };
  });
  done(r);
})().catch(e => done({scriptError: String(e)}));
"""

# A phone widens its layout viewport (and zooms out) when the page is wider than the screen, so the page
# width is compared with the device width, not with innerWidth. Content inside a box that scrolls
# (a code block, a wide table's wrapper) is fine; content cut off by a box that clips is not.
PHONE_FACTS = r"""
const width = arguments[0];
const scrolls = el => {
  for (let a = el.parentElement; a && a !== document.documentElement; a = a.parentElement) {
    if (['auto', 'scroll'].includes(getComputedStyle(a).overflowX)) return true;
  }
  return false;
};
const wide = [...document.body.querySelectorAll('*')].filter(el => {
  const rect = el.getBoundingClientRect();
  return rect.width > 0 && rect.right > width + 1 && getComputedStyle(el).visibility === 'visible' &&
    !scrolls(el);
});
const leaves = wide.filter(el => !wide.some(other => other !== el && el.contains(other)));
const described = leaves.map(el => {
  const math = el.closest('mjx-container');
  if (math && window.MathJax && MathJax.startup.document) {
    const item = MathJax.startup.document.getMathItemsWithin(math.parentElement)[0];
    return 'formula ' + (item ? item.math : '?').slice(0, 80);
  }
  const cls = (el.getAttribute('class') || '').trim().split(/\s+/).filter(Boolean).slice(0, 3).join('.');
  return el.tagName.toLowerCase() + (cls ? '.' + cls : '') + ' "' + (el.textContent || '').trim().slice(0, 50) + '"';
});
return {
  width: Math.max(window.innerWidth, document.documentElement.scrollWidth),
  offenders: [...new Set(described)].slice(0, 5),
};
"""

SEARCH_RESULTS = r"""
const done = arguments[arguments.length - 1];
const start = Date.now();
(function poll() {
  const summary = document.querySelector('#search-results .search-summary, p.search-summary');
  if (summary && summary.textContent.trim()) {
    done([...document.querySelectorAll('#search-results ul.search li')].map(li => {
      const a = li.querySelector('a'); return a ? a.getAttribute('href') : '';
    }));
  } else if (Date.now() - start > 20000) {
    done(null);
  } else {
    setTimeout(poll, 100);
  }
})();
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def find_program(env: str, *names: str) -> str:
    for candidate in (os.environ.get(env), *names):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise SystemExit(f"browser check: {names[0]} not found (set {env}, or `apt-get install -y chromium "
                     "chromium-driver fonts-wqy-microhei`; `make browser` does it as root)")


def start_browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_program("CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check",
                 "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=zh-CN",
                 f"--window-size={DESKTOP[0]},{DESKTOP[1]}", f"--user-data-dir={profile}",
                 # The network is off: no name resolves but 127.0.0.1, and the proxy is a closed port
                 # (loopback bypasses it).
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                 "--proxy-server=127.0.0.1:9"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(executable_path=find_program("CHROMEDRIVER", "chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(60)
    driver.set_page_load_timeout(60)
    return driver


def network_problems(driver, origin: str) -> list[str]:
    problems = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if is_external(url, origin):
                problems.append(f"requests {url} from outside the book")
        elif message["method"] == "Network.responseReceived":
            response = params["response"]
            if response.get("status", 200) >= 400:
                problems.append(f"{response['url']} answered {response['status']}")
        elif message["method"] == "Network.loadingFailed" and params.get("errorText") != "net::ERR_ABORTED":
            problems.append(f"a request failed: {params.get('errorText')} ({params.get('type', '')})")
    return problems


def console_errors(driver) -> list[str]:
    return [entry["message"][:300] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def set_viewport(driver, size: tuple[int, int], mobile: bool) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile})


def check_page(driver, base: str, page: str, shots: Path) -> list[str]:
    problems = []
    url = urllib.parse.urljoin(base, page + ".html")
    set_viewport(driver, DESKTOP, mobile=False)
    driver.get_log("browser"), driver.get_log("performance")
    driver.get(url)
    facts = driver.execute_async_script(PAGE_FACTS, WIDGET_CODE.pattern)
    if "scriptError" in facts:
        return [f"the page script failed: {facts['scriptError']}"]
    if facts["math"] and not facts["mathjax"]:
        problems.append(f"MathJax did not load: {facts['math']} formulas left as TeX")
    if facts.get("mathjaxError"):
        problems.append(f"MathJax failed: {facts['mathjaxError']}")
    if facts["unrendered"]:
        problems.append(f"{len(facts['unrendered'])} of {facts['math']} formulas not rendered, e.g. "
                        f"{facts['unrendered'][0]!r}")
    for error in facts["texErrors"]:
        problems.append(f"TeX error: {error}")
    for snippet in raw_tex(facts["text"])[:5]:
        problems.append(f"raw TeX outside code: ...{snippet}...")
    for src in facts["brokenImages"]:
        problems.append(f"image did not load: {src}")
    widget_shown = [w for w in facts["widgets"] if w["images"] or w["widgets"]]
    widget_blank = [w for w in facts["widgets"] if not (w["images"] or w["widgets"])]
    if page in WIDGETS_WITHOUT_STATIC:
        if facts["widgets"] and not widget_blank:
            problems.append(f"its widget section now shows a figure or widget: remove {page} from "
                            "WIDGETS_WITHOUT_STATIC in tools/check_browser.py")
        else:
            print(f"browser check: {page}: known gap, no static counterpart yet for "
                  f"{WIDGETS_WITHOUT_STATIC[page]}")
    else:
        for widget in widget_blank:
            problems.append(f"widget section {widget['section']!r} shows no image or rendered widget "
                            "(add a figure of what the widget shows across its range, or saved widget state)")
    driver.execute_script("""
        const math = document.querySelector('div.math mjx-container');
        if (math) window.scrollTo(0, math.getBoundingClientRect().top + window.scrollY - 250);""")
    time.sleep(0.2)
    shots.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shots / (page.replace("/", "__") + ".png")))
    # Phone width: reload, so that the layout and MathJax run as on a phone.
    set_viewport(driver, PHONE, mobile=True)
    driver.get(url)
    driver.execute_async_script(PAGE_FACTS, WIDGET_CODE.pattern)
    phone = driver.execute_script(PHONE_FACTS, PHONE[0])
    if phone["width"] > PHONE[0] + 1 or phone["offenders"]:
        problems.append(f"does not fit a {PHONE[0]} px phone (page {phone['width']} px wide): "
                        + "; ".join(phone["offenders"]))
    problems += [f"console error: {message}" for message in console_errors(driver)]
    problems += network_problems(driver, base)
    problems = list(dict.fromkeys(problems))  # the phone pass reloads the page: the same errors again
    print(f"browser check: {page}: {facts['math']} formulas ({facts['containers']} rendered), "
          f"{facts['images']} images, {len(widget_shown)}/{len(facts['widgets'])} widget sections shown, "
          f"{len(problems)} problems")
    return problems


def check_search(driver, base: str, expected: dict[str, str]) -> list[str]:
    problems = []
    set_viewport(driver, DESKTOP, mobile=False)
    for term, page in expected.items():
        driver.get(urllib.parse.urljoin(base, "search.html?q=" + urllib.parse.quote(term)))
        hrefs = driver.execute_async_script(SEARCH_RESULTS)
        if hrefs is None:
            problems.append(f"search {term!r}: no result summary after 20 s")
            continue
        found = {docname(href, driver.current_url) for href in hrefs}
        if term in GLOSSARY_NOT_IN_CHAPTER:
            if page in found:
                problems.append(f"search {term!r} now finds {page}: remove it from GLOSSARY_NOT_IN_CHAPTER")
            else:
                print(f"browser check: known gap, search {term!r} finds only {sorted(found)}: "
                      f"{GLOSSARY_NOT_IN_CHAPTER[term]}")
        elif page not in found:
            problems.append(f"search {term!r} does not find {page} (found: {sorted(found) or 'nothing'})")
    problems += [f"console error on the search page: {message}" for message in console_errors(driver)]
    problems += network_problems(driver, base)
    problems = list(dict.fromkeys(problems))
    print(f"browser check: search: {len(expected)} terms, {len(problems)} problems")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="?", default="_build/html")
    parser.add_argument("--screenshots", default="_build/screenshots")
    parser.add_argument("--pages", nargs="*", help="only these toc pages (e.g. notebooks/05_gcg)")
    args = parser.parse_args(argv)
    html = Path(args.html)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    pages = [str(Path(name).with_suffix("")) for name in toc_files(toc)]
    notation = (ROOT / "book" / "notation.md").read_text(encoding="utf-8")
    expected = search_expectations(notation, pages)
    if args.pages:
        pages = [page for page in pages if page in args.pages]
    shots = Path(args.screenshots)
    if shots.exists():
        shutil.rmtree(shots)
    server, base = serve(html)
    problems = []
    with tempfile.TemporaryDirectory(prefix="check-browser-") as profile:
        driver = start_browser(profile)
        try:
            for page in pages:
                problems += [f"{page}: {problem}" for problem in check_page(driver, base, page, shots)]
            problems += check_search(driver, base, expected)
        finally:
            driver.quit()
            server.shutdown()
    for problem in problems:
        print("browser check:", problem)
    print(f"browser check: {len(pages)} pages, {len(expected)} searches, {len(problems)} problems; "
          f"screenshots in {shots}/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
