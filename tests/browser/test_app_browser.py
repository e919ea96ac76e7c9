"""The standalone app (`python -m merge_core app`) driven in a real headless Chromium.

Needs playwright (Python) and a Chromium binary: Debian's `chromium` at
/usr/bin/chromium (or $CHROMIUM); Playwright's own browser download is not used.
Skipped when either is missing, unless MANIFOLD_REQUIRE_BROWSER=1 (set by
.ci/webui.sh), which makes that a failure. MANIFOLD_SCREENSHOT=path saves the
finished tab there (docs/screenshot-tab.png is made this way).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from merge_core.engine import merge
from merge_core.io.sources import open_model

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = bool(os.environ.get("MANIFOLD_REQUIRE_BROWSER"))
if not REQUIRED:
    pytest.importorskip("playwright")
    pytest.importorskip("gradio")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)
from playwright.sync_api import expect, sync_playwright  # noqa: E402

DEMO = ["demo_model_1.safetensors", "demo_model_2.safetensors", "demo_model_3.safetensors"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # MANIFOLD_APP_DIR: serve a folder of your choice (a realistic path for the README's screenshots)
    folder = Path(os.environ.get("MANIFOLD_APP_DIR") or tmp_path_factory.mktemp("app") / "models")
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(folder.parent / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "merge_core", "app", "--models", str(folder), "--demo",
                             "--port", str(port), "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the app did not start:\n{(folder.parent / 'app.log').read_text()}")
            time.sleep(0.5)
    yield url, folder
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    page.goto(url)
    page.wait_for_selector("#manifold_merge_models input")
    return page


def _pick(page, names):
    for name in names:
        page.click("#manifold_merge_models input")
        page.click(f'#manifold_merge_models li[aria-label="{name}"]')
    page.keyboard.press("Escape")


def _listing(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_karcher_merge_and_save_in_the_browser(app, browser):
    url, folder = app
    page = _open(browser, url)
    _pick(page, DEMO)
    page.fill("#manifold_merge_weights textarea", "1 1 2")
    page.fill("#manifold_merge_name textarea", "browser_karcher")
    expect(page.locator("#manifold_merge_recipe")).to_contain_text("0.5", timeout=30_000)  # weights 1:1:2 -> 0.25 0.25 0.5
    page.click("#manifold_merge_save")
    expect(page.locator("#manifold_merge_status")).to_contain_text(
        "Saved browser_karcher.safetensors", timeout=180_000)
    out = folder / "browser_karcher.safetensors"
    assert out.is_file()
    expected = merge([folder / n for n in DEMO], "karcher", weights=[1, 1, 2]).state_dict
    with open_model(out) as src:
        assert set(src.keys()) == set(expected)
        for key, value in expected.items():
            assert torch.equal(src.load(key), value), key
    # the new file is offered in the pickers at once
    page.click("#manifold_merge_models input")
    expect(page.locator('#manifold_merge_models li[aria-label="browser_karcher.safetensors"]')).to_have_count(1)
    page.keyboard.press("Escape")
    shot = os.environ.get("MANIFOLD_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)
    page.close()


def test_inspect_shows_the_similarity_heatmap(app, browser):
    url, folder = app
    page = _open(browser, url)
    page.get_by_role("tab", name="Inspect").click()
    for name in DEMO:
        page.click("#manifold_merge_inspect_models input")
        page.click(f'#manifold_merge_inspect_models li[aria-label="{name}"]')
    page.keyboard.press("Escape")
    page.click("#manifold_merge_inspect_run")
    expect(page.locator("#manifold_merge_inspect_status")).to_contain_text("Compared 1130 tensors", timeout=120_000)
    cells = page.locator("#manifold_merge_heatmap td")
    expect(cells).to_have_count(9)
    # per block: 26 SD1 blocks x 3 pairs of models
    expect(page.locator("#manifold_merge_block_similarity td")).to_have_count(26 * 3)
    expect(page.locator("#manifold_merge_block_similarity")).to_contain_text("OUT11")
    expect(page.locator("#manifold_merge_inspect_table")).to_contain_text("sd1")
    shot = os.environ.get("MANIFOLD_SCREENSHOT_INSPECT")
    if shot:
        page.screenshot(path=shot, full_page=True)
    page.close()


@pytest.mark.parametrize("name,message", [("../outside", "path separators"),
                                          ("demo_model_1", "demo_model_1.safetensors already exists")])
def test_bad_input_shows_the_error_and_writes_nothing(app, browser, name, message):
    url, folder = app
    before = _listing(folder.parent)
    page = _open(browser, url)
    _pick(page, DEMO[:2])
    page.fill("#manifold_merge_name textarea", name)
    page.click("#manifold_merge_save")
    expect(page.locator("#manifold_merge_status")).to_contain_text(message, timeout=60_000)
    expect(page.locator("#manifold_merge_status")).to_contain_text("Error:")
    assert _listing(folder.parent) == before
    assert (folder / "demo_model_1.safetensors").stat().st_size > 1000  # the input is untouched
    page.close()


def test_block_weights_preset_and_one_slider_then_save_equals_the_cli(app, browser, tmp_path):
    """Pick a preset, move one block's slider, Save: the file equals the CLI's with the block values the
    text box shows (the sliders and the comma list round-trip)."""
    from merge_core.cli import main
    url, folder = app
    page = _open(browser, url)
    _pick(page, DEMO[:2])
    page.locator("#manifold_merge_method").get_by_text("slerp", exact=True).click()
    page.locator("#manifold_merge_blocks_section").get_by_text("Block weights").first.click()
    expect(page.locator("#manifold_merge_blocks_note")).to_contain_text("SD1.x (26 blocks)", timeout=30_000)
    expect(page.locator("#manifold_merge_block_25")).to_be_visible(timeout=30_000)
    page.click("#manifold_merge_block_preset input")
    page.click('#manifold_merge_block_preset li[aria-label="grad_in_out"]')
    page.keyboard.press("Escape")
    text = page.locator("#manifold_merge_blocks textarea")
    expect(text).not_to_have_value("", timeout=30_000)
    preset_line = text.input_value()
    assert len(preset_line.split(",")) == 26
    # move IN03's slider (the 5th) with a click on its track: a user's drag, ending in a release
    slider = page.locator("#manifold_merge_block_4 input[type=range]")
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 2)
    expect(text).not_to_have_value(preset_line, timeout=30_000)
    line = text.input_value()
    values = [float(v) for v in line.split(",")]
    expected_values = [float(v) for v in preset_line.split(",")]
    assert values[4] != expected_values[4] and values[4] > 0.7
    assert values[:4] + values[5:] == expected_values[:4] + expected_values[5:]
    page.fill("#manifold_merge_name textarea", "browser_blocks")
    page.click("#manifold_merge_save")
    expect(page.locator("#manifold_merge_status")).to_contain_text("Saved browser_blocks.safetensors",
                                                                   timeout=180_000)
    cli_out = tmp_path / "cli_blocks.safetensors"
    assert main(["merge", "--models", *[str(folder / n) for n in DEMO[:2]], "--method", "slerp", "--blocks", line,
                 "--output", str(cli_out), "-q"]) == 0
    with open_model(folder / "browser_blocks.safetensors") as ours, open_model(cli_out) as cli:
        assert set(ours.keys()) == set(cli.keys())
        for key in cli.keys():
            assert torch.equal(ours.load(key), cli.load(key)), key
    page.close()


def _progress_owners(page) -> list[str]:
    """The components that show a running job's progress text right now."""
    return page.evaluate("""() => [...document.querySelectorAll('.progress-text')]
        .filter(e => e.offsetParent !== null && !e.closest('.wrap.hide'))  // gradio's hidden trackers: class hide
        .map(e => ((e.closest('[id]') || {}).id || '?') + '|' +
            (e.closest('.wrap') || {}).className + '|' + e.textContent.trim().slice(0, 40))""")


def test_a_hyper_merge_shows_one_progress_display(app, browser):
    url, folder = app
    page = _open(browser, url)
    page.get_by_role("tab", name="Hyper-merge").click()
    for name in DEMO:
        page.click("#manifold_merge_hyper_models input")
        page.click(f'#manifold_merge_hyper_models li[aria-label="{name}"]')
    page.keyboard.press("Escape")
    page.fill("#manifold_merge_hyper_ranks textarea", "8 8")
    page.fill("#manifold_merge_hyper_name textarea", "one_bar")
    page.click("#manifold_merge_hyper_run")
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:
        owners = _progress_owners(page)
        if owners:
            seen.append(owners)
        if "Wrote one_bar_hyper" in page.locator("#manifold_merge_hyper_status").inner_text():
            break
        time.sleep(0.2)
    assert seen, "no progress was shown"
    assert all(len(owners) == 1 and owners[0].startswith("manifold_merge_hyper_status|") for owners in seen), \
        [o for o in seen if len(o) != 1 or not o[0].startswith("manifold_merge_hyper_status|")]
    expect(page.locator("#manifold_merge_hyper_tags textarea")).to_have_value(re.compile("<lora:one_bar_0-8:"))
    page.close()


def test_automatic_name_bake_vae_discard_and_drop_ema_equal_the_cli(app, browser, tmp_path):
    """Empty name: an A1111-style automatic one; the output options give the CLI's file; the new file is
    offered in every picker at once."""
    from merge_core.cli import main
    from merge_core.io import save_safetensors
    url, folder = app
    with open_model(folder / DEMO[0]) as src:
        vae = {k[len("first_stage_model."):]: src.load(k).float() * 0 + 0.125
               for k in src.keys() if k.startswith("first_stage_model.")}
    (folder / "VAE").mkdir(exist_ok=True)
    save_safetensors(folder / "VAE" / "test_vae.safetensors", vae)
    page = _open(browser, url)
    page.click("#manifold_merge_refresh")  # the VAE list follows the folder
    _pick(page, DEMO[:2])
    page.locator("#manifold_merge_method").get_by_text("weighted", exact=True).click()
    page.locator("#manifold_merge_output_options").get_by_text("Output options").first.click()
    page.click("#manifold_merge_vae input")
    page.click('#manifold_merge_vae li[aria-label="test_vae.safetensors"]')
    page.keyboard.press("Escape")
    page.fill("#manifold_merge_discard textarea", r"attn1\.to_q")
    page.locator("#manifold_merge_drop_ema input").check()
    page.click("#manifold_merge_save")
    auto = "0.5(demo_model_1) + 0.5(demo_model_2).safetensors"
    expect(page.locator("#manifold_merge_status")).to_contain_text(f"Saved {auto}", timeout=180_000)
    cli_out = tmp_path / "cli.safetensors"
    assert main(["merge", "--models", *[str(folder / n) for n in DEMO[:2]], "--method", "weighted",
                 "--vae", str(folder / "VAE" / "test_vae.safetensors"), "--discard", r"attn1\.to_q", "--drop-ema",
                 "--output", str(cli_out), "-q"]) == 0
    with open_model(folder / auto) as ours, open_model(cli_out) as cli:
        assert set(ours.keys()) == set(cli.keys()) and not any("attn1.to_q" in k for k in ours.keys())
        for key in cli.keys():
            assert torch.equal(ours.load(key), cli.load(key)), key
        assert float(ours.load("first_stage_model.decoder.conv_in.bias").float().mean()) == 0.125
    for picker, tab in (("manifold_merge_models", None), ("manifold_merge_inspect_models", "Inspect"),
                        ("manifold_merge_hyper_models", "Hyper-merge")):
        if tab:
            page.get_by_role("tab", name=tab).click()
        page.click(f"#{picker} input")
        expect(page.locator(f'#{picker} li[aria-label="{auto}"]')).to_have_count(1)
        page.keyboard.press("Escape")
    page.close()


def test_errors_look_like_errors_and_speak_the_tabs_language(app, browser):
    url, folder = app
    page = _open(browser, url)
    _pick(page, DEMO)
    page.locator("#manifold_merge_method").get_by_text("karcher", exact=True).click()
    page.fill("#manifold_merge_karcher_tol input", "0")
    page.fill("#manifold_merge_name textarea", "bad_tol")
    page.click("#manifold_merge_save")
    error = page.locator("#manifold_merge_status .manifold-merge-error")
    expect(error).to_contain_text("“Karcher tolerance” must be in (0, 1]", timeout=60_000)
    assert "--" not in error.inner_text()
    colour = error.evaluate("e => getComputedStyle(e).color")
    assert colour == "rgb(217, 83, 79)", colour
    expect(page.locator("#manifold_merge_recipe_box")).to_be_hidden()  # no recipe for a file not written
    assert not (folder / "bad_tol.safetensors").exists()
    page.close()
