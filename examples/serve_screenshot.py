"""Screenshot of the ``covidct serve`` page after one upload, taken in headless Chromium (Selenium).

    python examples/serve_screenshot.py --checkpoint runs/default-covid-ct/ensemble.npz \
        --image slice.png --out docs/images/serve.png

Needs ``pip install -e ".[web]" selenium`` and Chromium with its driver
(Debian: ``apt-get install chromium chromium-driver``).
"""
from __future__ import annotations

import argparse
import shutil
import threading
from pathlib import Path

from covidct.serve import create_app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image", required=True, help="the slice to upload (PNG, JPEG or DICOM)")
    parser.add_argument("--out", default="docs/images/serve.png")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=700)
    args = parser.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(args.checkpoint), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={args.width},{args.height}", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        driver.find_element(By.ID, "file").send_keys(str(Path(args.image).resolve()))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "p-covid").text
                                        or d.find_element(By.ID, "error").text)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"P(COVID) {driver.find_element(By.ID, 'p-covid').text or '-'}; wrote {args.out}")
    finally:
        driver.quit()
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
