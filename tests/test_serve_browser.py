"""The web page of `blip2 serve` in headless Chromium (Debian's `chromium`, driven by Playwright): pick an image
or drop one, ask, and the streamed answer on the page equals the API's answer."""

from __future__ import annotations

import base64
import functools
import io
import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium binary (apt-get install chromium); Playwright must not download its own",
                allow_module_level=True)

import blip2  # noqa: E402
from blip2.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from fixtures import sample_image  # noqa: E402
from hf_models import checkpoint_with_processor as _checkpoint  # noqa: E402
from test_serve import Client, chat_body  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser-opt")
    _checkpoint("blip2-opt", d)
    model = blip2.load(d)
    with BackgroundServer(create_app(model, ServeSettings(model_name="tiny"))) as s:
        s.model = model
        yield s


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page()
        pg.set_default_timeout(20_000)
        yield pg
        browser.close()


def _ask(page, question: str) -> tuple[str, int]:
    """Ask on the page; (answer text, in how many separate moments the answer grew)."""
    page.evaluate("""() => {
        window.__updates = 0;  // observer callbacks: mutations that happen together arrive in one
        new MutationObserver(() => { window.__updates += 1; })
            .observe(document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    return page.text_content("#answer"), page.evaluate("window.__updates")


def test_pick_an_image_ask_and_see_the_streamed_answer(server, page, tmp_path, monkeypatch):
    forward = server.model.llm.forward

    @functools.wraps(forward)
    def slow(*a, **kw):  # 15 ms a token, so that the answer visibly arrives over half a second
        time.sleep(0.015)
        return forward(*a, **kw)

    monkeypatch.setattr(server.model.llm, "forward", slow)
    img = sample_image(40)
    img.save(tmp_path / "astronaut.png")
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('chat')")
    assert "tiny (blip2)" in page.text_content("#model")
    page.click("#send")  # no image yet: the page says so
    assert "choose an image first" in page.text_content("#status")
    page.set_input_files("#file", str(tmp_path / "astronaut.png"))
    page.wait_for_function("document.getElementById('status').textContent === 'image ready'")
    assert page.is_visible("#preview") and page.text_content("#hint") == "astronaut.png"
    text, updates = _ask(page, "what is the man holding?")
    expected = Client(server.url).post("/v1/chat/completions", chat_body(img, "what is the man holding?",
                                                                         max_tokens=40))[1]
    assert text == expected["choices"][0]["message"]["content"] and text
    assert updates >= 3, "the answer should appear piece by piece"
    page.screenshot(path=str(tmp_path / "page.png"))


def test_drop_an_image_and_get_a_caption(server, page):
    img = sample_image((48, 36))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    page.goto(server.url + "/")
    # a drop as the browser delivers it: a DataTransfer holding the file
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", base64.b64encode(buf.getvalue()).decode())
    page.wait_for_function("document.getElementById('status').textContent === 'image ready'")
    assert page.text_content("#hint") == "dropped.png"
    text, _ = _ask(page, "")  # no question: a caption
    expected = Client(server.url).post("/v1/chat/completions", chat_body(img, max_tokens=40))[1]
    assert text == expected["choices"][0]["message"]["content"]
