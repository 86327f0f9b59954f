"""report.html: self-contained, rebuilt by `guardx report`, and looked at in a real headless browser."""
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from guardx.config import load_config
from guardx.data.distilled import image_path, save_png
from guardx.report import rebuild, summarize, write_pipeline_report

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _fake_run(tmp_path: Path):
    """A finished two-method, two-seed pipeline run: report.json plus the run folders the page reads."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"run.out_dir={out}", "data.dataset=digits", "run.seeds=[0,1]",
                             "evaluate.eps=[1/255,2/255,4/255]", "evaluate.attacks=[pgd100]",
                             "pipeline.methods=[{name: sre2l}, {name: guard, objective: {name: guard}}]"])
    metrics = ["clean", "pgd100@1/255", "pgd100@2/255", "pgd100@4/255"]
    rows = []
    for mi, method in enumerate(("sre2l", "guard")):
        for seed in (0, 1):
            run_dir = out / method / f"seed{seed}"
            for c in range(10):
                g = torch.Generator().manual_seed(100 * mi + c)
                save_png(torch.rand(3, 32, 32, generator=g), image_path(run_dir / "recover" / "images", str(c), 0))
            (run_dir / "recover" / "manifest.json").write_text("{}")
            (run_dir / "squeeze").mkdir(parents=True, exist_ok=True)
            history = [{"epoch": e, "loss": 2.0 / e, "ce": 1.5 / e, "reg": 0.1 * mi / e + 1e-3} for e in (1, 2, 3)]
            (run_dir / "squeeze" / "metrics.json").write_text(json.dumps({"history": history}))
            for model, base in (("teacher", 90.0), ("student", 50.0)):
                acc = {m: base - 10 * k + 3 * mi + seed for k, m in enumerate(metrics)}
                rows.append({"method": method, "model": model, "seed": seed, "run_dir": str(run_dir),
                             "accuracy": {"n": 359, **acc}, "counts": {}})
    report = {"rows": rows, "metrics": metrics, "seeds": [0, 1], "stage_seconds": {"sre2l/squeeze/seed0": 1.5},
              "total_seconds": 12.0, "config": cfg.to_dict(), "environment": {"device_name": "CPU: test",
                                                                                "torch": torch.__version__,
                                                                                "threads": 2}}
    report.update(summarize(report, cfg))
    write_pipeline_report(report, cfg, out)
    return out


def test_report_is_self_contained_and_rebuilds(tmp_path):
    out = _fake_run(tmp_path)
    page = (out / "report.html").read_text()
    for section in ("Accuracy", "Robust accuracy against ε", "Distilled images", "Squeeze curves", "Stage timings"):
        assert f"<h2>{section}</h2>" in page
    assert page.count('src="data:image/png;base64,') == 3  # ε curves, images, squeeze curves — all embedded
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "guard − sre2l" in page and "better" in page  # guard is +3 points on every seed: a verdict
    (out / "report.html").unlink()
    (out / "report.md").unlink()
    assert rebuild(out) == out / "report.html" and (out / "report.html").read_text() == page
    assert "| guard | student | 2 |" in (out / "report.md").read_text()


def _browser():
    if os.environ.get("GUARDX_REQUIRE_BROWSER") != "1" and not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless-browser check skipped: Debian's chromium and chromium-driver are not installed "
                    "(.ci/run installs them: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _blank(png: bytes) -> bool:
    """True when a screenshot region is (nearly) one colour."""
    from PIL import Image, ImageStat

    im = Image.open(io.BytesIO(png)).convert("L")
    return ImageStat.Stat(im).stddev[0] < 5.0


def test_report_renders_in_a_headless_browser(tmp_path):
    out = _fake_run(tmp_path)
    driver = _browser()
    try:
        driver.get((out / "report.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not errors, errors
        images = driver.find_elements("tag name", "img")
        assert len(images) == 3
        for img in images:
            alt = img.get_attribute("alt")
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img), alt
            assert not _blank(img.screenshot_as_png), f"figure {alt!r} rendered blank"
        assert not _blank(driver.get_screenshot_as_png())
    finally:
        driver.quit()
