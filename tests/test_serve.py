"""covidct serve: the Flask app through its test client, and the page in a real headless Chromium."""
import base64
import importlib.util
import io
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from covidct.cli import build_parser
from covidct.predict import predict_files
from covidct.synthetic import make_slice
from conftest_models import write_checkpoint

flask = pytest.importorskip("flask")

from covidct.serve import MAX_UPLOAD_BYTES, create_app  # noqa: E402  (needs Flask)

SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve-model") / "best.npz", "tiny", threshold=0.42)


@pytest.fixture(scope="module")
def client(checkpoint):
    return create_app(checkpoint).test_client()


def phantom_png(path, label=1, seed=0, size=48):
    gray = make_slice(label, np.random.default_rng(seed), size=size)
    Image.fromarray((gray * 255).astype(np.uint8)).save(path)
    return path


def decode(data_uri):
    assert data_uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1])))


def post(client, data: bytes, name: str):
    return client.post("/api/predict", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def test_page_shows_the_upload_field_and_threshold(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert 'id="file" type="file"' in text and ">0.42<" in text and "best.npz" in text


def test_png_upload_gives_the_cli_number_and_four_pictures(client, checkpoint, tmp_path, monkeypatch):
    private_tmp = tmp_path / "private-tmp"
    private_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(private_tmp))     # where the app may write
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    path = phantom_png(tmp_path / "slice.png")
    reply = post(client, path.read_bytes(), "slice.png")
    assert reply.status_code == 200, reply.get_json()
    result = reply.get_json()
    rows, failures, threshold = predict_files(checkpoint, [path])
    assert not failures and result["p_covid"] == pytest.approx(rows[0]["p_covid"], abs=1e-6)
    assert result["threshold"] == threshold == 0.42 and result["label"] == rows[0]["label"]
    assert result["kind"] == "png" and result["file"] == "slice.png"
    pictures = {key: decode(uri) for key, uri in result["images"].items()}
    assert pictures["slice"].size == (SIZE, SIZE) and pictures["slice"].mode == "L"
    assert pictures["gradcam"].size == (SIZE, SIZE) and pictures["gradcam"].mode == "RGB"
    assert pictures["lungs"].size == (SIZE, SIZE)
    assert result["feature_maps"]["count"] == 4                     # the tiny preset's first conv: 4 filters
    assert pictures["features"].size == (2 * 32 + 1, 2 * 32 + 1)   # 2 x 2 tiles of 32 x 32, 1 px apart
    assert 0 <= result["lung_fraction"] <= 1
    assert list(private_tmp.iterdir()) == [] and list(workdir.iterdir()) == []   # nothing left behind



def test_an_ensemble_checkpoint_is_served_like_one_model(tmp_path):
    from covidct.ensemble import save_ensemble
    members = [write_checkpoint(tmp_path / f"m{seed}.npz", "tiny", seed=seed, epoch=3) for seed in (1, 2)]
    ensemble = save_ensemble(tmp_path / "ensemble.npz", members, threshold=0.45, tta=True)
    path = phantom_png(tmp_path / "slice.png", seed=3)
    reply = post(create_app(ensemble).test_client(), path.read_bytes(), "slice.png")
    assert reply.status_code == 200, reply.get_json()
    result = reply.get_json()
    rows, failures, _ = predict_files(ensemble, [path])
    assert not failures and result["p_covid"] == pytest.approx(rows[0]["p_covid"], abs=1e-6)
    assert result["threshold"] == 0.45 and result["feature_maps"]["layer"].endswith("(member 1 of 2)")
    assert decode(result["images"]["gradcam"]).size == (SIZE, SIZE)

def test_dicom_upload_goes_through_the_ct_window(client, checkpoint, tmp_path):
    pytest.importorskip("pydicom")
    from test_scan import phantom, write_dicom
    from covidct.checkpoint import load_checkpoint
    from covidct.predict_scan import predict_scan

    path = write_dicom(tmp_path / "slice.dcm", phantom(slices=1, size=40)[0], z=0)
    reply = post(client, path.read_bytes(), "slice.dcm")
    assert reply.status_code == 200, reply.get_json()
    model, meta = load_checkpoint(checkpoint)
    expected = predict_scan(model, meta, path).rows[0]["p_covid"]
    assert reply.get_json()["kind"] == "dicom" and reply.get_json()["p_covid"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("data, name, status, message", [
    (b"hello, not an image", "notes.txt", 400, "notes.txt: not a PNG, JPEG or DICOM file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "broken.png", 400, "broken.png: not a readable image"),
    (b"\xff\xd8\xff" + b"\x00" * 10, "cut.jpg", 400, "cut.jpg: "),
    pytest.param(b"\x00" * 128 + b"DICM" + b"\x00" * 20, "empty.dcm", 400, "empty.dcm: no pixel data",
                 marks=pytest.mark.skipif(importlib.util.find_spec("pydicom") is None,
                                          reason="reading DICOM needs the dicom extra (pydicom)")),
], ids=["text", "broken-png", "cut-jpeg", "empty-dicom"])
def test_bad_uploads_get_one_clear_error(client, data, name, status, message):
    reply = post(client, data, name)
    assert reply.status_code == status
    error = reply.get_json()["error"]
    assert error.startswith(message) and "\n" not in error and "/tmp" not in error


def test_missing_and_oversized_uploads_are_refused(client):
    assert client.post("/api/predict", data={}).get_json()["error"].startswith("no file")
    reply = post(client, b"\x89PNG\r\n\x1a\n" + b"\x00" * MAX_UPLOAD_BYTES, "huge.png")
    assert reply.status_code == 413 and "larger than 16 MB" in reply.get_json()["error"]


def test_serve_binds_to_localhost_by_default():
    args = build_parser().parse_args(["serve", "--checkpoint", "best.npz"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_serve_on_a_busy_port_is_one_line(checkpoint, capsys):
    import socket

    from covidct.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there") and error.count("\n") == 1


# ------------------------------------------------------------------ a real browser
def chromium_driver():
    """A headless Chromium via Selenium, or skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture
def live_server(checkpoint):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(checkpoint), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def test_page_in_headless_chromium(live_server, checkpoint, tmp_path):
    driver = chromium_driver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(live_server)
        assert "look inside a prediction" in driver.title
        path = phantom_png(tmp_path / "phantom.png", label=1, seed=4)
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "p-covid").text
                                        or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == ""
        rows, _, _ = predict_files(checkpoint, [path])
        assert driver.find_element(By.ID, "p-covid").text == f"{rows[0]['p_covid']:.4f}"
        assert driver.find_element(By.ID, "label").text == rows[0]["label"]
        for key in ("slice", "gradcam", "lungs", "features"):
            width = driver.execute_script(
                "const img = document.getElementById(arguments[0]); return img.complete ? img.naturalWidth : 0;",
                f"img-{key}")
            assert width > 0, key
        assert "4 feature maps of the first conv layer, Conv2d 1->4, 3x3, stride 1" in driver.find_element(By.ID, "features-caption").text
        if os.environ.get("COVIDCT_SCREENSHOT"):
            driver.save_screenshot(os.environ["COVIDCT_SCREENSHOT"])

        driver.find_element(By.ID, "file").send_keys(__file__)          # a .py file: refused
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text)
        assert "test_serve.py: not a PNG, JPEG or DICOM file" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
