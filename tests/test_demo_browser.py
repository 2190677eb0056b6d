"""``dslo demo`` in a real browser: the page served on a free loopback port, driven by headless
Chromium (Debian's ``chromium`` package through Playwright; never ``playwright install``).

Slow (a browser start and Gradio's first page load take ~20 s here); skips with the reason
when chromium, playwright or gradio is absent. The model is the tiny random ViT of
tests/test_demo.py, so no weights are needed.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(page, selector: str) -> list[list[str]]:
    # Gradio's data frame draws its body as a virtual list of role="row" elements
    rows = page.locator(f"{selector} .virtual-row[role=row]")
    return [[c.strip() for c in rows.nth(i).locator("[role=gridcell]").all_inner_texts()] for i in range(rows.count())]


def _upload_status(port: int, size: int) -> int:
    """HTTP status of a multipart upload of ``size`` bytes to Gradio's upload route."""
    import urllib.error
    import urllib.request

    boundary = "dslo-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + bytes(size) + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_page_compares_two_methods_on_a_shipped_example(tmp_path, monkeypatch):
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium not installed (apt-get install -y chromium chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'dslo[demo]')")
    from test_demo import _photo, make_catalogue

    from dslo.integrations.demo import DemoApp, serve, shipped_examples
    from dslo.integrations.demo_compare import palette_image

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tiny = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56,
        initializer_range=0.3)).eval()
    catalogue, _, _ = make_catalogue(tiny)
    # the checkout's examples when it ships some, else a photo offered through --images
    images = tmp_path / "images"
    images.mkdir()
    example = next(iter(shipped_examples()), None) or _photo(images, "street.png")
    with Image.open(example) as im:
        width, height = im.size
    mask = np.zeros((height, width), np.int64)
    mask[height // 2:] = 1
    mask[height * 3 // 4:, width // 2:] = 2
    palette_image(torch.from_numpy(mask), 3).save(tmp_path / "truth.png")
    (tmp_path / "notes.png").write_text("not an image")

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "unused"))  # serve() sets its own; restored after
    (tmp_path / "work").mkdir()
    app = DemoApp(catalogue, images=images, workdir=tmp_path / "work")
    port = _free_port()
    page_app = serve(app, host="127.0.0.1", port=port, block=False)
    try:
        upload_status = _upload_status(port, 25 * 2**20 + 1)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#compare", timeout=60_000)
            assert "attention sd2" not in page.locator("body").inner_text()  # sd2 fails only when built

            # bad input: a message on the page, no traceback
            page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "notes.png"))
            page.wait_for_timeout(1000)
            page.click("#compare")
            page.wait_for_function("() => document.querySelector('#message').innerText.includes('not an image')",
                                   timeout=60_000)
            assert "Traceback" not in page.locator("body").inner_text()

            page.locator("#photo button[aria-label='Clear']").first.click()
            page.locator("#photo input[type=file]").set_input_files(str(example))
            page.locator("#mask input[type=file]").set_input_files(str(tmp_path / "truth.png"))
            page.wait_for_timeout(1000)
            # two methods: velocity (checked by default) and path; "none" unchecked
            page.locator("#methods").get_by_text("none:", exact=False).click()
            page.locator("#methods").get_by_text("path:", exact=False).click()
            page.click("#compare")
            try:
                page.wait_for_function("() => document.querySelectorAll('#results .virtual-row[role=row]').length == 2",
                                       timeout=120_000)
            except sync_api.TimeoutError:
                page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
                raise AssertionError(f"no result table; message: {page.locator('#message').inner_text()!r}, "
                                     f"page picture: {tmp_path / 'failed.png'}") from None
            rows = _table(page, "#results")
            timings = page.locator("#timings").inner_text()
            key = page.locator("#key").inner_text()
            browser.close()
    finally:
        page_app.close()
        expected = app.compare(example, tmp_path / "truth.png", "prototype", "", ["dinov2"], ["velocity", "path"])
        app.close()
    assert upload_status == 413  # over MAX_UPLOAD: refused before it is stored
    assert [r[:2] for r in rows] == [["velocity", "dinov2"], ["path", "dinov2"]]
    for row, want in zip(rows, expected.table):
        assert float(row[2]) > 0
        assert float(row[3]) == pytest.approx(want["mIoU"], abs=0.01)
        assert float(row[4]) == pytest.approx(want["pixel accuracy"], abs=0.01)
    assert "model prototype" in timings and "attention dinov2" in timings
    assert "class key" in key
    assert not (tmp_path / "unused").exists() and not app.folder.exists()
