"""The HTML report (`captionflow.report`): its data files and thumbnails on a 10,000-image
output, and the page itself in a real headless Chromium, opened from disk (file://).

The output is made of real parts: `CaptionRecord`s written as `imagefolder_row` lines,
`ErrorRecord`s, `summarize`'s summary, and real JPEGs (the example photos, cropped and turned,
reused under 10,000 names through hard links). Part of it is still in checkpoint part files, as
a run that was killed leaves it, with records repeated between the parts and the final file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captionflow.jsonl import dumps
from captionflow.lock import OutputLock
from captionflow.records import CaptionRecord, ErrorRecord, ScoredCaption
from captionflow.report import REPORT_MARKER, build_report, write_report
from captionflow.report.data import js_value
from captionflow.report.thumbs import THUMBS_DIR, thumb_key
from captionflow.transforms.summary import summarize
from captionflow.transforms.write import ERRORS_FILE, REJECTED_FILE, imagefolder_row, parts_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
RECORDS = 10_000
SOURCES = 50
IN_FINAL_FILE = 9_000  # the rest only in part files, as a killed run leaves them
REPEATED = 500  # in both the final file and the parts
REJECTED = 30
PAGE_SIZE = 200
SIDE = 128  # smaller than the default 192: 10,000 thumbnails in a few seconds
LOWEST = 4321  # the image with the lowest score
LOWEST_TEXT = '</script><img src=x onerror="window.hacked=1"> lowest & worst caption'
SEARCHED = 777  # an image with a word no other caption has
SEARCH_WORD = "zanzibar"
NO_SCORE = (11, 12, 13)  # ranked by nothing (--ranker none)
MISSING = 42  # its image is gone: a placeholder
NOT_AN_IMAGE = 43  # its image is text now: a placeholder
ERROR_TYPES = {"UnidentifiedImageError": ("decode", 6), "FileNotFoundError": ("read", 3)}
TOO_LARGE = "ImageTooLargeError"  # one more, only in the errors' part file
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DASH = "\u2013"  # the en dash of the page's ranges
WORDS = "cat dog tree river house boat car bird mountain street field flower window".split()


def _sources(folder: Path) -> list[Path]:
    """50 small JPEGs: crops of the example photos, one stored sideways with an EXIF turn."""
    folder.mkdir(parents=True)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    paths = []
    for i in range(SOURCES):
        with Image.open(photos[i % len(photos)]) as photo:
            photo = photo.convert("RGB")
            width, height = photo.size
            left, top = (i * 7) % (width // 4), (i * 5) % (height // 4)
            crop = photo.crop((left, top, left + width * 3 // 4, top + height * 3 // 4))
            crop = crop.resize((256 + (i % 5) * 16, 200 - (i % 3) * 8))
            path = folder / f"source_{i:02d}.jpg"
            if i == 0:  # stored landscape, shown portrait
                exif = Image.Exif()
                exif[0x0112] = 6
                crop.save(path, quality=85, exif=exif)
            else:
                crop.save(path, quality=85)
        paths.append(path)
    return paths


def _score(i: int) -> float:
    if i == LOWEST:
        return 0.0123
    return 0.15 + ((i * 7919) % 1000) / 5000  # 0.15 to 0.35, all distinct enough


def _record(i: int, uri: str, width: int, height: int) -> CaptionRecord:
    word = WORDS[i % len(WORDS)]
    text = f"a photo of a {word} number {i}" + " with more words" * (i % 4)
    if i == LOWEST:
        text = LOWEST_TEXT
    if i == SEARCHED:
        text = f"a {SEARCH_WORD} sunset over the water"
    score = _score(i)
    ranked = i not in NO_SCORE
    candidates = tuple(
        ScoredCaption(candidate, score - drop if ranked else None, probability if ranked else None)
        for candidate, drop, probability in (
            (text, 0.0, 0.7),
            (f"another {word}", 0.01, 0.2),
            (f"a blurry {word}", 0.05, 0.1),
        )
    )
    return CaptionRecord(
        image_uri=uri,
        text=text,
        score=score if ranked else None,
        candidates=candidates,
        captioner="blip:Salesforce/blip-image-captioning-base",
        ranker="clip:openai/clip-vit-base-patch32" if ranked else "none",
        width=width,
        height=height,
    )


def make_output(root: Path) -> Path:
    """An output of 10,000 captioned images (9,000 in metadata.jsonl, 1,500 in part files, 500
    of them in both), 30 rejected, 10 failed, and its summary."""
    output = root / "out"
    images = output / "images"
    sources = _sources(root / "sources")
    sizes = []
    for path in sources:
        with Image.open(path) as image:
            width, height = image.size
        sizes.append((height, width) if path.name == "source_00.jpg" else (width, height))
    images.mkdir(parents=True)
    row = imagefolder_row(str(output))
    lines = []
    for i in range(RECORDS + REJECTED):
        path = images / f"img_{i:05d}.jpg"
        if i == NOT_AN_IMAGE:
            path.write_text("not an image any more")
        elif i != MISSING:
            os.link(sources[i % SOURCES], path)
        record = _record(i, str(path), *sizes[i % SOURCES])
        if i >= RECORDS:  # rejected: below --min-score
            record = CaptionRecord(**{**record.__dict__, "score": 0.05 + (i - RECORDS) / 1000})
        lines.append(row(record))
    captioned, rejected = lines[:RECORDS], lines[RECORDS:]
    (output / "metadata.jsonl").write_text("\n".join(captioned[:IN_FINAL_FILE]) + "\n")
    parts = Path(parts_dir(str(output / "metadata.jsonl")))
    parts.mkdir()
    late = captioned[IN_FINAL_FILE - REPEATED :]
    for n in range(3):
        chunk = late[n * 500 : (n + 1) * 500]
        (parts / f"part-run1-{n:04x}.jsonl").write_text("\n".join(chunk) + "\n")
    (parts / ".tmp-run1-9999").write_text(captioned[0][:50])  # a part being written: ignored
    (output / REJECTED_FILE).write_text("\n".join(rejected) + "\n")

    errors = []
    for error_type, (stage, count) in ERROR_TYPES.items():
        for n in range(count):
            uri = str(images / f"broken_{error_type}_{n}.jpg")
            message = f"cannot identify image file '{uri}' <b>{n}</b>"
            errors.append(ErrorRecord(uri, stage, error_type, message))
    (output / ERRORS_FILE).write_text("\n".join(dumps(e.to_dict()) for e in errors) + "\n")
    error_parts = Path(parts_dir(str(output / ERRORS_FILE)))
    error_parts.mkdir()
    huge = ErrorRecord(str(images / "huge.png"), "decode", TOO_LARGE, "20000x20000 = too many")
    (error_parts / "part-run1-0000.jsonl").write_text(dumps(huge.to_dict()) + "\n")

    counts = {"captioned": RECORDS, "rejected": REJECTED}
    for error in [*errors, huge]:
        key = f"failed/{error.stage}/{error.error_type}"
        counts[key] = counts.get(key, 0) + 1
    settings = {
        "input": str(images),
        "output": str(output),
        "captioner": "blip:Salesforce/blip-image-captioning-base",
        "ranker": "clip:openai/clip-vit-base-patch32",
        "decoding": {"num_captions": 3, "strategy": "sample", "bad_words": []},
        "device": "cuda",
        "dtype": "bfloat16",
        "min_score": 0.1,
    }
    summary = summarize(counts, 123.4, settings)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return output


def _chunk_rows(path: Path) -> tuple[str, int, list[Any]]:
    """A data file's kind, index and rows, read back as JSON."""
    text = path.read_text(encoding="utf-8")
    found = re.fullmatch(r'captionflowReport\("([a-z-]+)",(\d+),(\[.*\])\);\n', text, re.S)
    assert found, f"{path} is not one registration call"
    return found[1], int(found[2]), json.loads(found[3])


def _folder_size(folder: Path) -> tuple[int, int]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return len(files), sum(path.stat().st_size for path in files)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The output and its report, made once: the output folder, the page, what
    `build_report` returned, and how long making the output took."""
    root = tmp_path_factory.mktemp("report")
    started = time.perf_counter()
    output = make_output(root)
    made = time.perf_counter() - started
    built = build_report(str(output), page_size=PAGE_SIZE, thumbnail_side=SIDE, workers=2)
    return {"output": output, "page": Path(built.path), "built": built, "setup_seconds": made}


def test_js_value_cannot_end_a_script() -> None:
    text = js_value(["</script><!-- \u2028\u2029 & é", None, 0.5])
    assert "<" not in text and "\u2028" not in text and "\u2029" not in text
    assert json.loads(text) == ["</script><!-- \u2028\u2029 & é", None, 0.5]


def test_report_of_10000_images(report: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    output, page, built = report["output"], report["page"], report["built"]
    folder = page.parent
    assert page == output / "report" / "index.html" and page.is_file()
    assert (folder / REPORT_MARKER).is_file()  # what an input folder's listing may skip
    assert built.partial  # part files remain: a killed run's output
    assert (built.captions, built.rejected, built.failures) == (RECORDS, REJECTED, 10)

    # The data: compact chunks of at most 5,000 records, each image once.
    data = folder / "data"
    captions = sorted(data.glob("captions-0*.js"))
    assert [path.name for path in captions] == ["captions-00000.js", "captions-00001.js"]
    rows: list[Any] = []
    for index, path in enumerate(captions):
        kind, number, chunk = _chunk_rows(path)
        assert (kind, number) == ("captions", index) and len(chunk) <= 5000
        rows += chunk
    assert len(rows) == RECORDS
    # Images under the output are named by file name alone; the page adds the output's path.
    assert all(row[0] is None and row[1].startswith("images/") for row in rows)
    uris = [f"{output}/{row[1]}" for row in rows]
    assert len(set(uris)) == RECORDS
    candidates: list[Any] = []
    for path in sorted(data.glob("captions-candidates-*.js")):
        candidates += _chunk_rows(path)[2]
    assert len(candidates) == RECORDS
    by_uri = {uris[n]: (row, candidates[n]) for n, row in enumerate(rows)}
    lowest, lowest_candidates = by_uri[str(output / "images" / f"img_{LOWEST:05d}.jpg")]
    assert lowest[2] == LOWEST_TEXT and lowest[3] == 0.0123
    assert lowest_candidates[0] == [LOWEST_TEXT, 0.0123, 0.7]
    assert lowest[1] == f"images/img_{LOWEST:05d}.jpg"  # file_name, relative to the output
    unranked = by_uri[str(output / "images" / f"img_{NO_SCORE[0]:05d}.jpg")]
    assert unranked[0][3] is None and unranked[1][0][1:] == [None, None]
    for path in data.iterdir():  # no caption can close a script or open a comment
        assert "<" not in path.read_text(encoding="utf-8"), path
    assert sum(len(_chunk_rows(p)[2]) for p in data.glob("rejected-0*.js")) == REJECTED
    errors = _chunk_rows(data / "errors-00000.js")[2]
    assert sorted({row[2] for row in errors}) == sorted([*ERROR_TYPES, TOO_LARGE])

    # Thumbnails: one per readable image, small, upright; placeholders for the others.
    thumbs = folder / THUMBS_DIR
    made = sorted(thumbs.glob("*.jpg"))
    assert len(made) == RECORDS + REJECTED - 2
    assert built.thumbnails.made == len(made) and built.thumbnails.unreadable == 2
    for path in made:
        with Image.open(path) as image:
            assert max(image.size) <= SIDE and image.format == "JPEG"
    for i in (MISSING, NOT_AN_IMAGE):
        uri = str(output / "images" / f"img_{i:05d}.jpg")
        assert by_uri[uri][0][4] == "" and not (thumbs / f"{thumb_key(uri)}.jpg").exists()
    turned = thumbs / f"{thumb_key(str(output / 'images' / 'img_00000.jpg'))}.jpg"
    with Image.open(turned) as image:
        assert image.height > image.width  # EXIF orientation applied
    assert max(path.stat().st_size for path in made) < 20_000

    # The page: the summary at the top, the data named in its config, nothing from the network.
    html = page.read_text(encoding="utf-8")
    assert "images per second" in html and "bfloat16" in html and 'id="histogram"' in html
    assert "Partial output" in html
    assert re.search(r"""(src|href)=["']?(https?:)?//""", html) is None
    assert LOWEST_TEXT not in html  # the records are in the data files only
    for asset in ("report.js", "report.css"):
        script = (folder / asset).read_text(encoding="utf-8")
        assert "innerHTML" not in script and "http://" not in script and "https://" not in script
        assert "fetch(" not in script and "XMLHttpRequest" not in script

    # Again: no thumbnail is made twice.
    mtimes = {path: path.stat().st_mtime_ns for path in made}
    again = build_report(str(output), page_size=PAGE_SIZE, thumbnail_side=SIDE, workers=2)
    assert again.thumbnails.made == 0 and again.thumbnails.kept == len(made)
    assert {path: path.stat().st_mtime_ns for path in made} == mtimes

    files, size = _folder_size(folder)
    with capsys.disabled():
        print(
            f"\nreport of {RECORDS:,} images: first {built.seconds:.1f} s "
            f"({built.thumbnails.made:,} thumbnails, 2 threads), again {again.seconds:.1f} s; "
            f"{files:,} files, {size / 1e6:.1f} MB "
            f"(data {_folder_size(data)[1] / 1e6:.1f} MB, "
            f"thumbs {_folder_size(thumbs)[1] / 1e6:.1f} MB); "
            f"fake output made in {report['setup_seconds']:.1f} s"
        )


def test_partial_output_of_parts_only(tmp_path: Path) -> None:
    """A run killed before it joined anything: no metadata.jsonl, no summary; a metadata
    file named by --output (`captions.jsonl`)."""
    output = tmp_path / "out"
    image = output / "a b é.jpg"
    output.mkdir()
    shutil.copy(EXAMPLES / "cat.jpg", image)
    parts = Path(parts_dir(str(output / "captions.jsonl")))
    parts.mkdir()
    record = _record(1, str(image), 451, 300)
    hostile = "blip:</script><script>window.hacked=1</script>"  # a model named by anyone
    line = imagefolder_row(str(output))(CaptionRecord(**{**record.__dict__, "captioner": hostile}))
    (parts / "part-a.jsonl").write_text(line + "\n" + "{not json\n")
    (parts / "part-b.jsonl").write_text(line + "\n")  # the same image: a retried bundle
    with OutputLock(str(output)):  # the run, still going: a report never takes the lock
        page = write_report(str(output / "captions.jsonl"), thumbnail_side=64, workers=1)
    assert page == str(output / "report" / "index.html")
    html = Path(page).read_text(encoding="utf-8")
    assert "Partial output: a run is writing into it now (process " in html
    assert "1 unreadable line(s) skipped" in html
    assert "<script>window" not in html and "</script><script>" not in html
    assert "blip:&lt;/script&gt;&lt;script&gt;window.hacked=1&lt;/script&gt;" in html  # as text
    assert html.count("<script") == 2  # the config (data, escaped) and report.js
    with pytest.raises(FileNotFoundError):
        write_report(str(tmp_path / "nowhere"))
    (rows,) = [_chunk_rows(p)[2] for p in (output / "report" / "data").glob("captions-0*.js")]
    assert len(rows) == 1 and rows[0][1] == "a b é.jpg" and rows[0][4]
    with Image.open(output / "report" / THUMBS_DIR / f"{rows[0][4]}.jpg") as thumb:
        assert max(thumb.size) == 64


# The page in a real browser.


def _driver(tmp_path: Path) -> Any:
    from selenium import webdriver  # a dev dependency: missing, it is an error, not a skip
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1400",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # The Debian driver, given: Selenium Manager downloads nothing.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _requests(driver: Any) -> list[str]:
    """The URLs the browser requested so far, from its DevTools network events."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _severe(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is not installed: apt-get install -y chromium chromium-driver "
    "(the Makefile's test target does)",
)
def test_page_in_headless_chromium(report: dict[str, Any], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    page = report["page"]
    driver = _driver(tmp_path)
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(page.as_uri())
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Showing"))
        status = driver.find_element(By.ID, "status").text
        assert status == f"Showing 1{DASH}{PAGE_SIZE} of {RECORDS:,}", status

        def cards() -> list[Any]:
            return driver.find_elements(By.CSS_SELECTOR, "#grid .card")

        def texts(selector: str) -> list[str]:  # in one call, not one per element
            return driver.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0]))"
                ".map(function (e) { return e.textContent; })",
                selector,
            )

        def captions() -> list[str]:
            return texts("#grid .card .caption")

        assert len(cards()) == PAGE_SIZE
        images = driver.execute_script(
            "return Array.from(document.querySelectorAll('#grid .card img'))"
            ".map(function (i) { return [i.getAttribute('loading'), i.src]; })"
        )
        assert len(images) == PAGE_SIZE - 2  # two placeholders: images that cannot be read
        assert all(loading == "lazy" for loading, _ in images)
        assert all(src.startswith(page.parent.as_uri() + "/thumbs/") for _, src in images)
        assert len(texts("#grid .card .placeholder")) == 2
        wait.until(
            lambda d: d.execute_script(
                "var i = document.querySelector('#grid .card img');"
                "return i.complete && i.naturalWidth > 0"
            )
        )
        assert captions()[0] == "a photo of a cat number 0"  # file name order
        # Every request since the page's own is a file of the report folder: no network.
        requested = _requests(driver)
        requested = requested[requested.index(page.as_uri()) :]
        base = page.parent.as_uri() + "/"
        assert len(requested) > 3 and all(url.startswith(base) for url in requested), requested
        assert any(url.startswith(base + "data/captions-0") for url in requested)

        # Lowest score first: the planted worst caption, shown as text, not run as markup.
        Select(driver.find_element(By.ID, "sort")).select_by_value("score-asc")
        wait.until(lambda d: captions()[0] == LOWEST_TEXT)
        assert driver.execute_script("return window.hacked") is None
        scores = [float(score) for score in texts("#grid .score")]
        assert scores == sorted(scores)
        Select(driver.find_element(By.ID, "sort")).select_by_value("score-desc")
        wait.until(lambda d: captions()[0] != LOWEST_TEXT)
        scores = [float(score) for score in texts("#grid .score")]
        assert scores == sorted(scores, reverse=True) and scores[0] <= 0.35

        # The next page.
        driver.find_element(By.CSS_SELECTOR, "#pager-top button.page:nth-of-type(3)").click()
        wait.until(
            lambda d: d.find_element(By.ID, "status").text.startswith(f"Showing 201{DASH}400")
        )

        # Search: one caption has the word.
        driver.find_element(By.ID, "search").send_keys(SEARCH_WORD)
        wait.until(lambda d: len(cards()) == 1)
        assert captions() == [f"a {SEARCH_WORD} sunset over the water"]
        status = driver.find_element(By.ID, "status").text
        assert status == f"Showing 1{DASH}1 of 1 (filtered from 10,000)"
        driver.find_element(By.ID, "search").clear()
        driver.find_element(By.ID, "search").send_keys("worst")
        wait.until(lambda d: captions() == [LOWEST_TEXT])

        # The card's candidates, with their score bars and probabilities.
        cards()[0].click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "detail")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#candidates .candidate")) == 3)
        items = driver.find_elements(By.CSS_SELECTOR, "#candidates .candidate")
        assert items[0].find_element(By.CSS_SELECTOR, ".candidate-text").text == LOWEST_TEXT
        assert [i.find_element(By.CSS_SELECTOR, ".probability").text for i in items] == [
            "probability 70.0%",
            "probability 20.0%",
            "probability 10.0%",
        ]
        assert items[0].find_element(By.CSS_SELECTOR, ".bar .fill").get_attribute("style")
        assert driver.find_element(By.ID, "detail-caption").text == LOWEST_TEXT
        screenshot_detail = tmp_path / "report-detail.png"
        driver.save_screenshot(str(screenshot_detail))
        driver.find_element(By.ID, "detail-close").click()
        wait.until(expected_conditions.invisibility_of_element_located((By.ID, "detail")))

        # ← and → in the detail walk the sorted view.
        driver.find_element(By.ID, "reset").click()
        assert driver.find_element(By.ID, "search").get_attribute("value") == ""
        Select(driver.find_element(By.ID, "sort")).select_by_value("score-asc")
        wait.until(lambda d: len(cards()) == PAGE_SIZE and captions()[0] == LOWEST_TEXT)
        second = captions()[1]
        cards()[0].click()
        wait.until(lambda d: d.find_element(By.ID, "detail-caption").text == LOWEST_TEXT)
        driver.find_element(By.ID, "detail").send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: d.find_element(By.ID, "detail-caption").text == second)
        driver.find_element(By.ID, "detail").send_keys(Keys.ARROW_LEFT)
        wait.until(lambda d: d.find_element(By.ID, "detail-caption").text == LOWEST_TEXT)
        driver.find_element(By.ID, "detail-close").click()
        wait.until(expected_conditions.invisibility_of_element_located((By.ID, "detail")))

        # Length: shortest captions first, and a words filter.
        driver.find_element(By.ID, "reset").click()
        Select(driver.find_element(By.ID, "sort")).select_by_value("length-asc")
        wait.until(lambda d: len(captions()[0].split()) <= 6)
        driver.find_element(By.ID, "min-words").send_keys("12")
        wait.until(lambda d: all(len(c.split()) >= 12 for c in captions()))

        # The rejected tab, then the failures grouped by error type.
        driver.find_element(By.ID, "tab-rejected").click()
        wait.until(lambda d: len(cards()) == REJECTED)
        driver.find_element(By.ID, "tab-failures").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#failures .failure-group"))
        groups = {
            g.get_attribute("data-error-type"): g
            for g in driver.find_elements(By.CSS_SELECTOR, "#failures .failure-group")
        }
        assert set(groups) == {*ERROR_TYPES, TOO_LARGE}
        assert not driver.find_element(By.ID, "grid").is_displayed()
        unidentified = groups["UnidentifiedImageError"]
        assert unidentified.find_element(By.CSS_SELECTOR, ".count").text == "6"
        messages = unidentified.find_elements(By.CSS_SELECTOR, "td.message")
        assert len(messages) == 6 and "<b>0</b>" in messages[0].text  # text, not markup
        assert not unidentified.find_elements(By.CSS_SELECTOR, "td.message b")
        too_large = groups[TOO_LARGE].find_element(By.CSS_SELECTOR, "td.message").text
        assert too_large == "20000x20000 = too many"  # from the errors' part file

        # Back to the grid for the picture; and nothing went wrong in the console.
        driver.find_element(By.ID, "tab-captions").click()
        driver.find_element(By.ID, "reset").click()
        wait.until(lambda d: len(cards()) == PAGE_SIZE)
        wait.until(
            lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('#grid img')).slice(0, 12)"
                ".every(function (i) { return i.complete && i.naturalWidth > 0; })"
            )
        )
        driver.execute_script("window.scrollTo(0, 0)")
        screenshot = tmp_path / "report.png"
        assert driver.save_screenshot(str(screenshot))
        shutil.copy(screenshot, "/tmp/report-screenshot.png")
        print(f"screenshots: {screenshot}, {screenshot_detail}, /tmp/report-screenshot.png")
        assert _severe(driver) == []

        # The same folder served over HTTP, as from a bucket: relative paths only.
        handler = functools.partial(_QuietHandler, directory=str(page.parent))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            driver.get(f"http://127.0.0.1:{server.server_port}/index.html")
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Showing"))
            assert len(cards()) == PAGE_SIZE
            wait.until(
                lambda d: d.execute_script(
                    "var i = document.querySelector('#grid .card img');"
                    "return i.complete && i.naturalWidth > 0"
                )
            )
            assert _severe(driver) == []
        finally:
            server.shutdown()
            server.server_close()
    finally:
        driver.quit()


def test_captioning_in_place_never_takes_a_reports_thumbnails_for_images(tmp_path: Path) -> None:
    """`--input X --output X`, then a report, then a run again (a resume, say): the report's
    thumbnails are not inputs, at the top level or below, listed as a folder or by a glob."""
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from captionflow.listing import walk_files
    from captionflow.transforms import ReadImagePaths
    from tests.conftest import write_images

    images = [str(p) for p in write_images(tmp_path / "a", 2) + write_images(tmp_path / "b", 1)]
    for report in (tmp_path / "report", tmp_path / "b" / "report"):
        (report / "thumbs").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(report / "thumbs" / "0123.jpg")
        (report / REPORT_MARKER).write_text("")
    assert sorted(walk_files(str(tmp_path))) == sorted(images)
    with TestPipeline(runner="FnApiRunner") as pipeline:
        paths = pipeline | ReadImagePaths(str(tmp_path))
        assert_that(paths, equal_to(images))
    with TestPipeline(runner="FnApiRunner") as pipeline:  # a glob that reaches into them
        paths = pipeline | ReadImagePaths(str(tmp_path / "**" / "*.jpg"))
        assert_that(paths, equal_to(images))


def test_the_cli_writes_the_report_at_the_end_of_a_run_and_on_its_own(
    tmp_path: Path, tiny_blip: str, tiny_clip: str, capsys: pytest.CaptureFixture
) -> None:
    from captionflow.cli import main
    from tests.conftest import write_images

    write_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    argv = ["run", "--input", str(tmp_path / "images"), "--output", str(out), "--report"]
    assert main([*argv, "--captioner", f"blip:{tiny_blip}", "--ranker", f"clip:{tiny_clip}"]) == 0
    page = out / "report" / "index.html"
    assert f"report: {page}" in capsys.readouterr().out
    assert len(list((out / "report" / THUMBS_DIR).glob("*.jpg"))) == 3
    page.unlink()
    assert main(["report", str(out), "--thumbnail-side", "64"]) == 0
    assert page.is_file() and f"report: {page}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    remote = ["run", "--input", str(tmp_path / "images"), "--output", "gs://b/out", "--report"]
    assert main(remote) == 2
    assert "--report" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["OUT", "--page-size", "0"], "--page-size: must be at least 1, not 0"),
        (["OUT", "--thumbnail-side", "-5"], "--thumbnail-side: must be at least 1, not -5"),
        (["OUT", "--workers", "0"], "--workers: must be at least 1, not 0"),
        (["OUT", "--page-size", "x"], "--page-size: invalid int value: 'x'"),
        (["gs://b/out"], "gs://b/out is not a local folder: give --report-dir, a local folder"),
        (["OUT", "--report-dir", "gs://b/r"], "--report-dir must be a local folder, not gs://b/r"),
    ],
)
def test_the_report_commands_bad_values_are_named_by_their_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    from captionflow.cli import main

    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "a cat"}\n')
    assert main(["report", *(str(tmp_path) if a == "OUT" else a for a in args)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"captionflow: error: {message}")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("named", ["", "captions.jsonl"])
def test_a_folder_that_is_not_an_output_is_refused_and_nothing_is_written_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, named: str
) -> None:
    from captionflow.cli import main
    from tests.conftest import write_images

    write_images(tmp_path / "photos", 2)
    before = sorted(tmp_path.rglob("*"))
    argv = ["report", str(tmp_path / "photos" / named) if named else str(tmp_path / "photos")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"captionflow: error: {tmp_path / 'photos'} is not a captionflow output: it holds no "
        f"{named or 'metadata.jsonl'} (nor its checkpoints) and no summary.json"
    )
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(FileNotFoundError, match="is not a captionflow output"):
        write_report(str(tmp_path / "photos"))
