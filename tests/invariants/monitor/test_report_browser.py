"""The run report as a browser shows it: headless Chromium renders the page with every host name
unresolvable (so nothing can be fetched), and both its DOM and its screenshot are checked for the
curves and the tables.

Chromium is required (Debian: `apt-get install chromium`); set ALIGNKIT_SKIP_BROWSER=1 to skip on
a machine without it. The screenshot is decoded with zlib here, so no imaging library is needed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from alignkit.monitor.report import write_report
from alignkit.monitor.report_svg import PALETTE
from tests.unit.monitor.test_report import EVAL_STEPS, TRAIN_STEPS, make_run_dir

WIDTH, HEIGHT = 1280, 2000


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("ALIGNKIT_SKIP_BROWSER") == "1":
        pytest.skip("chromium not installed and ALIGNKIT_SKIP_BROWSER=1")
    pytest.fail("chromium is not installed: apt-get install chromium (or ALIGNKIT_SKIP_BROWSER=1)")


def run_chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",  # CI containers run as root, where the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # Every host name fails to resolve: the page must render with no network at all
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--window-size={WIDTH},{HEIGHT}",
        *args,
        page.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


# --------------------------------------------------------------------------- DOM


class DomSummary(HTMLParser):
    """Series paths (metric -> d) and table cells (table class -> rows of cell text)."""

    def __init__(self):
        super().__init__()
        self.paths: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.sections: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "path" and "series" in (a.get("class") or ""):
            self.paths[a["data-metric"]] = a["d"]
        elif tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "table":
            self._table = a.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


# --------------------------------------------------------------------------- PNG


def _unfilter_slow(kind: int, line: bytearray, prev: bytes, bpp: int) -> None:
    """PNG filters 3 (average) and 4 (Paeth) depend on the byte just decoded: one at a time."""
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up, up_left = prev[i], prev[i - bpp] if i >= bpp else 0
        if kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        else:
            p = left + up - up_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
            pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
            line[i] = (line[i] + pred) & 0xFF


def _unfilter(kind: int, line: bytes, prev: np.ndarray, bpp: int) -> np.ndarray:
    row = np.frombuffer(line, dtype=np.uint8)
    if kind == 0:
        return row.copy()
    if kind == 1:  # sub: a running sum along the row, per channel, wrapping at 256
        return np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind == 2:  # up
        return row + prev
    assert kind in (3, 4), f"unknown PNG filter {kind}"
    out = bytearray(line)
    _unfilter_slow(kind, out, prev.tobytes(), bpp)
    return np.frombuffer(bytes(out), dtype=np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB/RGBA PNG as a (height, width, 3) array; chunk CRCs are checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp + 1
    assert len(raw) == height * stride
    rows, prev = [], np.zeros(width * bpp, dtype=np.uint8)
    for y in range(height):
        prev = _unfilter(raw[y * stride], raw[y * stride + 1 : (y + 1) * stride], prev, bpp)
        rows.append(prev)
    return np.stack(rows).reshape(height, width, bpp)[:, :, :3]


def count_pixels(image: np.ndarray, colour: str, tol: int = 40) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image.astype(int) - rgb) <= tol).all(axis=2).sum())


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-browser")
    run = make_run_dir(root)
    page = write_report(run).path
    dom = run_chromium(page, root / "profile-dom", "--dump-dom").stdout
    shot = root / "report.png"
    run_chromium(page, root / "profile-shot", f"--screenshot={shot}")
    return dom, shot.read_bytes()


def test_dom_holds_the_curves(rendered):
    dom = DomSummary()
    dom.feed(rendered[0])
    assert dom.sections == ["overview", "curves", "health", "eval", "samples", "data", "config"]
    for metric in (
        "loss",
        "eval/loss",
        "rewards/margins",
        "eval/rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "grad_norm",
    ):
        assert metric in dom.paths, metric
    # one path vertex per logged value
    assert sum(dom.paths["loss"].count(c) for c in "ML") == TRAIN_STEPS
    assert sum(dom.paths["eval/loss"].count(c) for c in "ML") == len(EVAL_STEPS)


def test_dom_holds_the_tables(rendered):
    dom = DomSummary()
    dom.feed(rendered[0])
    assert ["eval/loss", "0.6931", "0.52", "-0.1731"] in dom.tables["eval train-eval"]
    assert ["accuracy", "0.5", "0.75", "+0.25"] in dom.tables["eval"]
    findings = dom.tables["findings"]
    assert findings[0] == ["step", "severity", "rule", "message", "reason", "fix"]
    assert findings[1][:3] == ["4", "warning", "accuracy_saturated_early"]
    assert "<10% of training>" in findings[1][3]  # escaped in the file, text again in the DOM
    assert ["rejected_logps_collapse", "ok", "rejected log-probs collapsing"] in dom.tables["rules"]
    prompt, before, after = dom.tables["samples"][1]
    assert prompt.startswith("<script>alert('x')</script> &") and after.startswith("Sure: 2 < 3")
    assert "stopped at the token limit" in after


def test_screenshot_shows_the_curves(rendered):
    image = decode_png(rendered[1])
    assert image.shape == (HEIGHT, WIDTH, 3)
    non_white = int((image.min(axis=2) < 200).sum())
    assert non_white > 0.01 * WIDTH * HEIGHT, "the page looks blank"
    # The first two series colours draw the train/eval curves: lines of hundreds of pixels.
    # Charts sit near the top: the curve colours must be there, not only in the tables below.
    for colour in PALETTE[:2]:
        assert count_pixels(image[:1400], colour) > 1000, colour
