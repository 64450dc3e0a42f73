"""`distill-sd serve`: the handlers (bad input refused with one clear line, good input gives images of the asked size)
and the page itself, driven end to end in headless Chromium."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web app needs gradio (pip install -c constraints.txt gradio)")

from distill_sd.app import build_app, load_studio, serve  # noqa: E402
from distill_sd.errors import UserError  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 # without these, the closed network makes chromium hang on its background requests
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GOOD = dict(prompt="a red cube", negative="", steps=2, guidance=7.5, seed=3, width=64, height=64, scheduler="dpm++")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A narrow random-weight SD-1.5 pipeline (64x64 by default; its images are noise)."""
    from distill_sd.models import save_pipeline
    from distill_sd.reference import reference_pipeline

    return save_pipeline(reference_pipeline("sd15", narrow=True), tmp_path_factory.mktemp("app") / "tiny-sd")


@pytest.fixture(scope="module")
def studio(model_dir):
    return load_studio(str(model_dir), device="cpu", dtype="fp32", max_side=256, max_steps=50)


def run(studio, **changes):
    p = {**GOOD, **changes}
    return studio.run(p["prompt"], p["negative"], p["steps"], p["guidance"], p["seed"], p["width"], p["height"],
                      p["scheduler"])


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="   "), "Enter a prompt"),
    (dict(prompt=None), "Enter a prompt"),
    (dict(steps=0), "steps must be between 1 and 50, got 0"),
    (dict(steps=51), "steps must be between 1 and 50, got 51"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps=None), "steps must be a number"),
    (dict(guidance=-1), "guidance must be between 0 and 20"),
    (dict(guidance=21), "guidance must be between 0 and 20"),
    (dict(width=70), "width must be a multiple of 8, got 70 (try 64)"),
    (dict(height=264), "height must be between 64 and 256, got 264"),
    (dict(height=32), "height must be between 64 and 256, got 32"),
    (dict(seed="abc"), "seed must be a number"),
    (dict(seed=-2), "seed must be between 0 and"),
    (dict(scheduler="nope"), "unknown scheduler 'nope'"),
])
def test_bad_input_is_refused_with_one_clear_line(studio, changes, message):
    with pytest.raises(gr.Error) as err:
        run(studio, **changes)
    assert message in err.value.message
    assert "\n" not in err.value.message and "Traceback" not in err.value.message
    assert err.value.print_exception is False  # a user's typo is not a server-side traceback either


def test_good_input_gives_an_image_of_the_asked_size_and_its_time(studio):
    image, timing = run(studio, width=72, height=64, scheduler="euler", negative="blurry")
    assert isinstance(image, Image.Image) and image.size == (72, 64)
    assert "s per image" in timing and "2 steps" in timing and "72×64" in timing and "seed 3" in timing
    assert type(studio.entries[0].pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert studio.default_side == 64


def test_random_seed_is_reported(studio):
    _, timing = run(studio, seed=-1)
    assert "seed " in timing and "seed -1" not in timing


def test_compare_runs_both_from_the_same_seed(model_dir):
    s = load_studio(str(model_dir), str(model_dir), device="cpu", dtype="fp32")
    assert [e.label for e in s.entries] == ["teacher: tiny-sd", "student: tiny-sd"]
    teacher_img, teacher_t, student_img, student_t = run(s)
    assert teacher_t.startswith("**teacher: tiny-sd**") and student_t.startswith("**student: tiny-sd**")
    np.testing.assert_array_equal(np.asarray(teacher_img), np.asarray(student_img))  # same model, same seed


def test_bad_server_options_are_user_errors():
    with pytest.raises(UserError, match="max_side must be a multiple of 8"):
        load_studio("unused", max_side=100)
    with pytest.raises(UserError, match="--port must be between"):
        serve("unused", port=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")
def test_page_in_headless_chromium(model_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    demo = build_app(str(model_dir), compare=str(model_dir), device="cpu", dtype="fp32", max_side=256)
    assert (demo._queue.max_size, demo._queue.default_concurrency_limit) == (16, 1)  # one generation at a time
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    shot = tmp_path / "app.png"
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            browser = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=30_000)
                page.locator("#generate").wait_for(timeout=30_000)

                # Empty prompt: a visible one-line message, no traceback, no images.
                page.locator("#generate").click()
                toast = page.locator("[data-testid=toast-body]")
                expect(toast.locator("[data-testid=toast-text]")).to_have_text("Enter a prompt: it is empty.",
                                                                               timeout=20_000)
                assert page.locator("#image-0 img").count() == 0
                toast.locator("[data-testid=toast-close]").click()
                expect(toast).to_have_count(0)

                page.locator("#prompt textarea").fill("a red cube on a table")
                steps = page.locator("#steps input[data-testid=number-input]")
                steps.fill("2")
                steps.press("Tab")
                page.locator("#generate").click()

                for i, role in enumerate(("teacher", "student")):
                    expect(page.locator(f"#image-{i} img")).to_be_visible(timeout=40_000)
                    expect(page.locator(f"#time-{i}")).to_contain_text(f"{role}: tiny-sd", timeout=10_000)
                    expect(page.locator(f"#time-{i}")).to_contain_text("s per image", timeout=10_000)
                    expect(page.locator(f"#time-{i}")).to_contain_text("2 steps, 64×64")
                assert "Traceback" not in page.content()
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        assert im.width >= 1000 and len(set(im.convert("L").resize((64, 64)).getdata())) > 8  # not a blank page
