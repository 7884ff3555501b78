import base64
import concurrent.futures
import hashlib
import http.client
import io
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import serve
from conftest import REPO, assert_one_line_error, run_cli, serving
from getData import DataError, load_image, prepare
from gradcam import GradCAM
from models import probabilities, resize_size, select_runtime, to_input
from testing import evaluate


@pytest.fixture(scope="module")
def server(trained):
    predictor = serve.Predictor(trained / "best.pt", select_runtime("cpu"), max_batch=8, max_wait_ms=20)
    with serving(serve.make_server(predictor, limits=serve.Limits(max_bytes=2_000_000, timeout=1.0,
                                                                  deadline=3.0))) as srv:
        yield srv


def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request(method, path, body, headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(data) if ctype.startswith("application/json") else data)


POST_HEAD = b"POST /predict HTTP/1.1\r\nHost: localhost\r\n"  # raw requests: a name the server answers to


def photo(synthetic, i=0):
    return sorted(synthetic.rglob("MKP_*.jpg"))[i].read_bytes()


def predict(srv, body, ctype="image/jpeg", query=""):
    return request(srv, "POST", f"/predict{query}", body, {"Content-Type": ctype})


def test_page_health_info(server):
    status, page = request(server, "GET", "/")
    assert status == 200 and b'type="file"' in page and b'fetch("/predict' in page
    assert b"http" not in page.split(b"<script>")[1]
    assert request(server, "GET", "/health") == (200, {"status": "ready", "model_loaded": True})
    status, info = request(server, "GET", "/info")
    assert status == 200 and info["model"] == "lenet" and info["input_size"] == 32 and len(info["classes"]) == 6
    best = torch.load(server.predictor.info["checkpoint"], weights_only=True)
    assert info["fold"] == 1 and info["epoch"] == best["epoch"] and info["calibrated"]
    assert info["valid"]["balanced_accuracy"] == best["metric"]["valid_bal_acc"]
    assert info["temperature"] == pytest.approx(best["temperature"])


def test_info_shows_test_scores_of_this_very_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "best.pt", run / "best.pt")
    rt = select_runtime("cpu")
    def test_scores(checkpoint):
        with serve.Predictor(checkpoint, rt) as predictor:
            return predictor.info["test"]
    assert test_scores(run / "best.pt") is None  # not evaluated yet
    m = evaluate(run / "best.pt", rt=rt, resamples=50)["softmax"].metrics  # writes run/test/metrics.json
    test = test_scores(run / "best.pt")
    assert test["accuracy"] == m["accuracy"] and test["ci95"] == m["ci95"] and test["n"] == m["n"]
    folds = tmp_path / "all"  # a --fold all run: testing.py writes all/test/fold1/metrics.json
    (folds / "fold1").mkdir(parents=True)
    shutil.copy(run / "best.pt", folds / "fold1" / "best.pt")
    evaluate(folds, rt=rt, resamples=50)
    assert test_scores(folds / "fold1" / "best.pt")["accuracy"] == m["accuracy"]
    other = torch.load(run / "best.pt", weights_only=True)
    other["epoch"] += 1  # another file, the same metrics.json beside it: no Test scores claimed for it
    torch.save(other, run / "best.pt")
    assert test_scores(run / "best.pt") is None


def test_a_closed_predictor_answers_what_was_queued_and_lets_its_thread_go(trained, synthetic):
    """A notebook or a program that makes one Predictor after another held every model before, each
    with a thread waiting on its queue for good."""
    with serve.Predictor(trained / "best.pt", select_runtime("cpu"), max_batch=2, max_wait_ms=50) as predictor:
        futures = [predictor.submit(load_image(photo_path)) for photo_path in sorted(synthetic.rglob("*.jpg"))[:3]]
    assert not predictor.worker.is_alive()
    assert all(f.done() and f.result()["probs"].shape == (6,) for f in futures)  # in two batches: 2, then 1


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one core: an OpenMP team is one thread, none to count")
def test_a_connections_thread_runs_no_torch_kernel(server, synthetic):
    """A connection's thread decodes, crops and draws its overlay with Pillow and NumPy. A live thread
    that has run a torch kernel keeps an OpenMP team of its own (its threads are the process's OS
    threads), and with more OpenMP threads than cores libgomp throttles every team: the inference
    thread's forward passes, and a notebook's or this suite's training, ran twice as slow while
    keep-alive connections stayed open or Predictors were left running."""
    server.predictor.submit(load_image(io.BytesIO(photo(synthetic))), True).result()  # the inference thread's team
    before = set(os.listdir("/proc/self/task"))
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    try:
        conn.request("POST", "/predict?gradcam=1", photo(synthetic), {"Content-Type": "image/jpeg"})
        assert "gradcam_png" in json.loads(conn.getresponse().read())
        started = set(os.listdir("/proc/self/task")) - before
        assert len(started) == 1, started  # the connection's own, waiting for its next request (measured: 2 then)
    finally:
        conn.close()


def test_one_pass_gives_label_probabilities_and_the_map_of_that_label(server, synthetic):
    predictor = server.predictor
    images = [load_image(p) for p in sorted(synthetic.rglob("*.jpg"))[:4]]
    futures = [predictor.submit(im, explain_it=i % 2 == 0) for i, im in enumerate(images)]
    explained = [f.result() for f in futures]
    plain = [predictor.submit(im).result() for im in images]
    x = torch.stack([prepare(im, resize_size(32)) for im in images])
    with GradCAM(predictor.model) as cam:
        logits = cam.forward(to_input(x, 32))
        probs = probabilities(logits[None], predictor.temperature).detach()
        maps = cam.maps(logits, probs.argmax(1))
    for i, (e, p) in enumerate(zip(explained, plain)):
        assert np.allclose(e["probs"], p["probs"], atol=1e-6) and np.allclose(e["probs"], probs[i].numpy(), atol=1e-6)
        assert (e["cam"] is not None) == (i % 2 == 0) and p["cam"] is None
        if e["cam"] is not None:
            assert np.allclose(e["cam"], maps[i].numpy(), atol=1e-5)  # the map of the returned class


def test_predict_raw_multipart_and_gradcam(server, synthetic):
    status, a = predict(server, photo(synthetic))
    assert status == 200 and a["label"] in a["probabilities"]
    assert sum(a["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert a["confident"] == (a["probability"] >= 0.6) and a["model"] == "lenet" and a["timing_ms"]["total"] > 0
    boundary = "xyzBOUNDARY"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo(synthetic) + f"\r\n--{boundary}--\r\n".encode()
    status, b = predict(server, body, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-6)
    status, c = predict(server, photo(synthetic), query="?gradcam=1")
    assert status == 200 and Image.open(io.BytesIO(base64.b64decode(c["gradcam_png"]))).format == "PNG"


def _bomb():
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")
    return buf.getvalue()


BAD = [  # (what, method, path, body, headers, status)
    ("not an image", "POST", "/predict", b"hello world", {"Content-Type": "image/jpeg"}, 400),
    ("empty body", "POST", "/predict", b"", {"Content-Type": "image/jpeg"}, 400),
    ("wrong content type", "POST", "/predict", b"{}", {"Content-Type": "application/json"}, 415),
    ("malformed multipart", "POST", "/predict", b"--x\r\nnonsense", {"Content-Type": "multipart/form-data"}, 400),
    ("multipart without file", "POST", "/predict",
     b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}, 400),
    ("unknown path", "GET", "/admin", None, {}, 404),
    ("wrong method", "GET", "/predict", None, {}, 405),
    ("wrong method PUT", "PUT", "/predict", b"x", {"Content-Type": "image/jpeg"}, 405),
    ("post to unknown", "POST", "/upload", b"x", {"Content-Type": "image/jpeg"}, 404),
]


@pytest.mark.parametrize("what,method,path,body,headers,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_json_error_and_server_survives(server, synthetic, what, method, path, body, headers, status):
    got, answer = request(server, method, path, body, headers)
    assert got == status and "error" in answer
    assert predict(server, photo(synthetic))[0] == 200


def test_truncated_image_and_bomb(server, synthetic):
    data = photo(synthetic)
    got, answer = predict(server, data[: len(data) // 2])
    assert got == 400 and "not a readable image" in answer["error"]
    got, answer = predict(server, _bomb(), "image/png")
    assert got == 413 and "pixels" in answer["error"]
    assert predict(server, data)[0] == 200


def test_413_comes_from_the_pixel_limit_error_type_not_its_wording(server, synthetic, monkeypatch):
    def worded(*a, **k):
        raise DataError("upload: over the limit of what this decoder reads")
    monkeypatch.setattr(serve, "load_image", worded)
    got, answer = predict(server, photo(synthetic))
    assert got == 400 and "limit" in answer["error"]


def test_oversized_body_refused_before_reading(server, synthetic):
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(POST_HEAD + b"Content-Type: image/jpeg\r\nContent-Length: 50000000\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):  # answered (and closed) without a single byte of the body sent
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"limit" in reply
    assert predict(server, photo(synthetic))[0] == 200


def test_stalled_client_times_out_without_blocking_others(server, synthetic):
    s = socket.create_connection(server.server_address[:2], timeout=10)
    s.sendall(POST_HEAD + b"Content-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\nabc")
    assert predict(server, photo(synthetic))[0] == 200  # served while the other client stalls
    start = time.perf_counter()
    reply = b""
    while chunk := s.recv(4096):  # the server answers the stalled client 408 and hangs up...
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b'"error"' in reply
    assert time.perf_counter() - start < 5  # ...after its 1 s timeout, not never
    s.close()


def test_concurrent_answers_equal_sequential(server, synthetic):
    bodies = [photo(synthetic, i) for i in range(12)]
    sequential = [predict(server, b)[1]["probabilities"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: predict(server, b)[1], bodies))
    for got, want in zip(answers, sequential):
        assert got["probabilities"] == pytest.approx(want, abs=1e-5)
    assert max(a["batch_size"] for a in answers) > 1  # requests really shared forward passes


def test_cli_without_checkpoint_says_what_to_run(tmp_path):
    assert_one_line_error(run_cli("serve.py", cwd=tmp_path),
                          "run `python train.py` first")


def test_without_checkpoint_it_serves_the_newest_best_pt_outside_hidden_folders(tmp_path):
    """An overwritten run set aside (`.replaced-by-*`, left by a kill -9) or a notebook's copy is no
    run a user trained last, however new its file."""
    for age, where in enumerate(("old", "new/fold2", ".replaced-by-1/fold1", ".ipynb_checkpoints")):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "best.pt").write_bytes(b"")
        os.utime(tmp_path / where / "best.pt", (1e9 + age, 1e9 + age))
    assert serve.newest_checkpoint(tmp_path) == tmp_path / "new" / "fold2" / "best.pt"


# ----------------------------------------------------------------------------- browser
def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class DevTools:
    """Chrome DevTools Protocol over --remote-debugging-pipe (fd 3 in, fd 4 out): no extra packages."""

    def __init__(self, binary, profile):
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def fds():  # runs in the child before close_fds, which then keeps 3 and 4 (pass_fds)
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf, self._id = b"", 0

    def call(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError("browser closed the pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]

    def close(self):
        self.proc.kill()
        self.proc.wait()


def upload_in_browser(srv, photo_path, profile) -> dict:
    """Open the page in headless Chromium, choose `photo_path` in its file input, and return what the
    page then shows (once the result or an error is up)."""
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    browser = DevTools(_chromium(), profile)
    try:
        target = browser.call("Target.createTarget", url=url)["targetId"]
        sid = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for _ in range(100):  # wait for the page
            if browser.call("Runtime.evaluate", sid, expression="!!document.getElementById('file')")["result"]["value"]:
                break
            time.sleep(0.1)
        root = browser.call("DOM.getDocument", sid)["root"]["nodeId"]
        node = browser.call("DOM.querySelector", sid, nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", sid, nodeId=node, files=[str(photo_path)])
        state = None
        for _ in range(200):
            state = browser.call("Runtime.evaluate", sid, returnByValue=True, expression=(
                "({shown: !document.getElementById('result').hidden,"
                " label: document.getElementById('label').textContent,"
                " bars: document.querySelectorAll('#bars .row').length, cam: document.getElementById('cam').src.length,"
                " camShown: document.getElementById('cam').offsetParent !== null,"
                " fill: (document.querySelector('#bars .fill') || {getBoundingClientRect: () => ({width: 0})})"
                ".getBoundingClientRect().width, facts: document.getElementById('model').textContent,"
                " ood: !document.getElementById('ood').hidden, barsFolded: !!document.querySelector('#more #bars'),"
                " folded: !document.getElementById('more').open,"
                " error: document.getElementById('error').textContent})"))["result"]["value"]
            if state["shown"] or state["error"]:
                break
            time.sleep(0.1)
        # markup injected into the page (say, through a class name) must not run: the policy's business
        browser.call("Runtime.evaluate", sid, expression="document.body.insertAdjacentHTML('beforeend', "
                     "'<img src=\"data:,\" onerror=\"window.injected = 1\">')")
        time.sleep(0.3)
        state["injected"] = browser.call("Runtime.evaluate", sid, expression="window.injected === 1")["result"]["value"]
    finally:
        browser.close()
    return state


@pytest.mark.skipif(not _chromium(), reason="no Chromium installed (apt-get install chromium)")
def test_browser_uploads_a_photo_and_shows_the_result(server, synthetic, tmp_path):
    state = upload_in_browser(server, sorted(synthetic.rglob("MKP_*.jpg"))[0], tmp_path / "profile")
    assert state["shown"] and not state["error"], state
    assert state["bars"] == 6 and state["cam"] > 1000 and state["camShown"] and state["fill"] > 0  # top bar drawn
    facts = state["facts"]
    assert "Answered by lenet, trained on fold 1" in facts and "Validation: accuracy" in facts
    assert "calibrated (temperature" in facts and "Test: not evaluated yet" in facts
    assert any(c in state["label"] for c in ("Chickenpox", "Cowpox", "HFMD", "Healthy", "Measles", "Monkeypox"))
    assert not state["ood"] and not state["barsFolded"]
    assert state["injected"] is False  # the page ran its own script (above) and no injected one


# ----------------------------------------------------------------------------- what a client may cost
@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    """A 6000 x 6000 RGB PNG of one colour: 120 KB to send, 144 MB to decode (Pillow keeps RGB as RGBX)."""
    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (150, 100, 80)).save(buf, "PNG")
    return buf.getvalue()


def _memory_kb(pid, key):
    return int(re.search(rf"{key}:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))


def test_large_uploads_at_once_stay_within_the_decode_budget_and_sigterm_ends_the_server(trained, synthetic,
                                                                                         big_png):
    """Eight 36-megapixel PNGs posted together to a server with a 200 MB decode budget: answered (200)
    or told to retry (503 with Retry-After), and the server's peak memory grows by less than the
    budget (without it: about 1.1 GB), by one decode at a time (144 MB) and what serving costs besides
    (measured 142 to 159 MB; 187 and 192 when a decode's pixels outlived its reservation). Then
    `docker stop`, `systemctl stop`, `kill PID`: the way a server is stopped, exit status 0 (one
    server process for both: each start is a torch import)."""
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", trained / "best.pt", "--port", "0",
                             "--device", "cpu", "--decode-mb", "200"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        srv = type("Address", (), {"server_address": ("127.0.0.1", port)})
        assert predict(srv, photo(synthetic))[0] == 200  # warm: the model's own memory is not the uploads'
        open(f"/proc/{proc.pid}/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
        base = _memory_kb(proc.pid, "VmRSS")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: _post_raw(port, big_png), range(8)))
        grown_mb = (_memory_kb(proc.pid, "VmHWM") - base) / 1024
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert {status for status, _ in replies} <= {200, 503} and any(status == 200 for status, _ in replies)
    assert all(headers.get("Retry-After") == "1" for status, headers in replies if status == 503)
    assert grown_mb < 180, grown_mb
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_the_decode_budget_gives_back_what_each_decode_reserved():
    """The room a decode reserves comes back when it ends, failed or not; a request that finds none
    waits for it, and is told to retry (Busy: 503) only when none comes in time."""
    budget = serve.DecodeBudget(100, wait_s=5)
    for _ in range(3):
        with budget.reserve(80):
            pass
    with pytest.raises(DataError), budget.reserve(80):
        raise DataError("a photo that does not decode")
    assert budget.free == 100
    entered = threading.Event()

    def decode():
        with budget.reserve(80):
            entered.set()
            time.sleep(0.2)
    first = threading.Thread(target=decode)
    first.start()
    entered.wait(5)
    with budget.reserve(80):  # waits for the first decode to end, then takes its room
        assert budget.free == 20
    first.join()
    busy = serve.DecodeBudget(100, wait_s=0.1)
    with busy.reserve(80), pytest.raises(serve.Busy), busy.reserve(30):
        pass
    assert busy.free == 100


def test_serving_leaves_the_process_reusing_the_memory_its_tensors_free(server, big_png):
    """glibc hands a freed buffer to the next allocation of its size. serve.py fixed its mmap threshold
    (for a server's memory to stay bounded) and so made every large tensor of a forward pass a fresh
    mapping, faulted in page by page: about 30% fewer requests a second. Page faults are counted, not
    time. The decodes' freed memory is handed back instead (the budget test above)."""
    def faults():
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(20):
            torch.ones(2**20)  # 4 MB, freed at once, as a forward pass's activations are
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    assert predict(server, big_png, "image/png")[0] == 200  # a large decode: the freed memory is handed back
    faults()  # so the first tensor is faulted in again, and its free raises glibc's mmap threshold above it
    assert faults() < 100, "every 4 MB tensor is a fresh mapping"  # measured: 10,240 then, 0 now


def _post_raw(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/predict", body, {"Content-Type": "image/png"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders())


def test_a_large_jpeg_is_decoded_small(server):
    """A 24-megapixel JPEG is decoded at 1/8 scale (DCT scaling), well inside any budget."""
    buf = io.BytesIO()
    Image.new("RGB", (6000, 4000), (150, 100, 80)).save(buf, "JPEG")
    budget = server.limits.budget
    seen, real = [], budget.reserve
    budget.reserve = lambda nbytes: (seen.append(nbytes), real(nbytes))[1]
    try:
        assert predict(server, buf.getvalue())[0] == 200
    finally:
        budget.reserve = real
    assert seen and seen[0] <= 750 * 500 * 4  # 6000 x 4000 / 8 per side, RGBX


def test_images_over_the_pixel_limit_are_413_whatever_their_size(server):
    for side in (9000, 14000):  # 81 MP: over our limit; 196 MP: over Pillow's own bomb limit too
        buf = io.BytesIO()
        Image.new("1", (side, side)).save(buf, "PNG")
        status, answer = predict(server, buf.getvalue(), "image/png")
        assert status == 413 and "pixel" in answer["error"], (side, answer)


def test_many_field_multipart_is_answered_at_once(server):
    """30,000 tiny fields (1.6 MB) cost the email parser 3.3 s of CPU; read linearly, and only the
    first MAX_PARTS of them, the refusal is immediate."""
    body = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i for i in range(30_000))
    body += b"--b--\r\n"
    start = time.perf_counter()
    status, answer = predict(server, body, "multipart/form-data; boundary=b")
    assert status == 400 and f"first {serve.MAX_PARTS} parts" in answer["error"]
    assert time.perf_counter() - start < 1.5


def test_the_image_is_found_in_a_multipart_body_however_it_is_named(server, synthetic):
    image = photo(synthetic)
    for disposition in ('form-data; name="image"', 'form-data; name="upload"; filename="a.jpg"',
                        'form-data; name="file"', "form-data; name=image", "form-data; name=\"upload\"; "
                        "filename*=UTF-8''%C3%A9t%C3%A9.jpg"):  # RFC 5987: a non-ASCII name, as some clients send
        body = (b"--xx\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--xx\r\nContent-Disposition: "
                + disposition.encode() + b"\r\nContent-Type: image/jpeg\r\n\r\n" + image + b"\r\n--xx--\r\n")
        assert predict(server, body, 'multipart/form-data; boundary="xx"')[0] == 200, disposition
    part = b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + image + b"\r\n"
    status, answer = predict(server, part + part + b"--xx--\r\n", "multipart/form-data; boundary=xx")
    assert status == 400 and "one photo per request" in answer["error"]  # two photos got one answer, no word of which


def test_a_slow_client_is_cut_off_at_the_deadline_while_others_are_served(server, synthetic):
    """One byte every 0.2 s: every read succeeds within the 1 s timeout, the whole request (37 s at
    that pace) does not within the 3 s deadline: the server hangs up at 3 s (with a 408 once the
    headers are in; still in its headers, as here, the client gets nothing more)."""
    s = socket.create_connection(server.server_address[:2], timeout=10)
    request_bytes = (POST_HEAD + b"Content-Type: image/jpeg\r\nContent-Length: 100\r\n\r\n"
                     + b"x" * 100)
    sent = []

    def trickle():
        try:
            for byte in request_bytes:
                s.sendall(bytes([byte]))
                sent.append(byte)
                time.sleep(0.2)
        except OSError:  # the server hung up
            pass
    threading.Thread(target=trickle, daemon=True).start()
    start = time.perf_counter()
    time.sleep(1.0)
    assert predict(server, photo(synthetic))[0] == 200  # others are served meanwhile
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    elapsed = time.perf_counter() - start
    s.close()
    assert reply in (b"",) or reply.startswith(b"HTTP/1.1 408"), reply[:40]
    assert 2.5 < elapsed < 5, elapsed
    assert len(sent) < len(request_bytes) / 2


def test_connections_over_the_limit_get_503_and_the_rest_are_served(trained, synthetic):
    predictor = serve.Predictor(trained / "best.pt", select_runtime("cpu"))
    with serving(serve.make_server(predictor, limits=serve.Limits(max_connections=2, deadline=2.0,
                                                                  timeout=2.0))) as srv:
        idle = [socket.create_connection(srv.server_address[:2]) for _ in range(2)]  # each holds a slot
        try:
            time.sleep(0.2)
            status, answer = request(srv, "GET", "/health")
            assert status == 503 and "too many connections" in answer["error"]
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        assert predict(srv, photo(synthetic))[0] == 200


def test_head_options_and_what_the_standard_library_refuses_are_json(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("HEAD", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"" and int(resp.getheader("Content-Length")) > 0
    conn.close()
    status, answer = request(server, "OPTIONS", "/predict")
    assert status == 200 and answer["allow"] == ["POST", "OPTIONS"]
    status, answer = request(server, "OPTIONS", "*")  # what the server takes at all
    assert status == 200 and answer["allow"] == ["GET", "HEAD", "OPTIONS", "POST"]
    for method, path, code in (("BREW", "/", 501), ("GET", "/" + "x" * 70_000, 414)):
        status, answer = request(server, method, path)
        assert status == code and isinstance(answer, dict) and answer["error"], (method, answer)
    many_headers = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    for line, code in ((b"GET / and more HTTP/1.1", 400), (b"GET /health HTTP/2.0", 505), (b"GET / HTTP/x", 400),
                       (many_headers, 431)):
        reply = raw_reply(server, line + b"\r\n\r\n")  # a request line that cannot be parsed: a status line still
        assert reply.startswith(b"HTTP/1.1 %d" % code) and b"application/json" in reply, reply[:200]


def test_a_client_that_leaves_before_its_error_reply_leaves_no_traceback(server, synthetic, monkeypatch, capsys):
    real = serve.Handler._send

    def gone(self, status, *a, **k):  # the client closed its socket before its 415 was written
        if status >= 400:
            raise BrokenPipeError(32, "Broken pipe")
        return real(self, status, *a, **k)
    monkeypatch.setattr(serve.Handler, "_send", gone)
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(POST_HEAD + b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi")
        assert s.recv(4096) == b""  # closed, answered nothing
    monkeypatch.setattr(serve.Handler, "_send", real)
    assert predict(server, photo(synthetic))[0] == 200
    assert "Traceback" not in capsys.readouterr().err


def test_errors_never_show_the_repr_of_an_in_memory_file(server):
    status, answer = predict(server, b"GIF89a" + b"\0" * 50, "image/gif")
    assert status == 400 and "object at 0x" not in answer["error"] and "upload" in answer["error"]


def test_scores_that_are_not_numbers_are_a_valid_json_500(trained, synthetic, tmp_path):
    predictor = serve.Predictor(trained / "best.pt", select_runtime("cpu"))
    predictor.temperature = float("nan")  # as a broken model would give
    with serving(serve.make_server(predictor)) as srv:
        status, answer = predict(srv, photo(synthetic))
    assert status == 500 and "not numbers" in answer["error"]  # json.loads in request() parsed it
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    for key, value in (("temperature", float("nan")), ("state_dict", None)):
        broken = dict(ckpt)
        if value is None:
            broken["state_dict"] = {k: v.clone() for k, v in ckpt["state_dict"].items()}
            broken["state_dict"]["head.weight"][0, 0] = float("nan")
        else:
            broken[key] = value
        torch.save(broken, tmp_path / "broken.pt")
        proc = run_cli("serve.py", "--checkpoint", tmp_path / "broken.pt", "--device", "cpu")
        assert_one_line_error(proc, "broken.pt")


@pytest.mark.parametrize("flag,value", [("--timeout", "-1"), ("--max-batch", "0"), ("--max-wait-ms", "-5"),
                                        ("--max-bytes", "-1"), ("--threshold", "nan"), ("--port", "70000"),
                                        ("--deadline", "0"), ("--decode-mb", "0"), ("--max-connections", "0"),
                                        # beyond what a socket's or a queue's timeout takes (OverflowError)
                                        ("--timeout", "1e308"), ("--deadline", "1e12"), ("--max-wait-ms", "1e308")])
def test_bad_serve_flags_are_one_line(trained, flag, value, capsys):
    with pytest.raises(SystemExit):  # refused while parsing: a regression fails here, not in a server left waiting
        serve.parse_args([flag, value])
    assert_one_line_error(run_cli("serve.py", "--checkpoint", trained / "best.pt", flag, value), f"{flag} {value}")


def test_a_load_test_flag_without_the_load_test_is_one_line(trained):
    """`--requests 100` without --benchmark was ignored without a word: the server started."""
    assert_one_line_error(run_cli("serve.py", "--checkpoint", trained / "best.pt", "--requests", 100),
                          "--requests 100 is the load test's: use it with --benchmark")


def raw_reply(srv, data: bytes) -> bytes:
    with socket.create_connection(srv.server_address[:2], timeout=10) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("headers,status", [
    (b"Content-Length: \xb2\r\n", 400),                                # a digit to str.isdigit, not to int()
    (b"Content-Length: %d\r\nContent-Length: 7\r\n", 400),             # two lengths that disagree
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n", 411),    # which framing? neither
], ids=["unicode digit", "two lengths", "chunked", "chunked and a length"])
def test_a_body_framed_two_ways_is_refused_and_smuggles_nothing(server, synthetic, headers, status):
    """Whatever follows the body we would have read must not be answered as a second request."""
    image = photo(synthetic)
    head = POST_HEAD + b"Content-Type: image/jpeg\r\n" + headers.replace(
        b"%d", str(len(image)).encode()) + b"\r\n"
    smuggled = b"GET /info HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reply = raw_reply(server, head + image + smuggled)
    assert reply.startswith(b"HTTP/1.1 %d" % status) and reply.count(b"HTTP/1.1") == 1, reply[:300]
    assert b"application/json" in reply and b'"error"' in reply
    assert predict(server, image)[0] == 200


def test_one_length_repeated_or_padded_with_spaces_is_one_length(server, synthetic):
    image = photo(synthetic)
    head = POST_HEAD + b"Content-Type: image/jpeg\r\nContent-Length: %d \r\n" \
           b"Content-Length: %d\r\n\r\n" % (len(image), len(image))
    reply = raw_reply(server, head + image + b"GET /info HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and b'"probabilities"' in reply and b'"limits"' in reply, reply[:300]


@pytest.mark.parametrize("method,framing", [(b"GET", b"Content-Length: %d"), (b"HEAD", b"Content-Length: %d"),
                                           (b"OPTIONS", b"Content-Length: %d"),
                                           (b"GET", b"Transfer-Encoding: chunked")])
def test_a_body_sent_where_none_is_taken_is_not_answered_as_a_second_request(server, method, framing):
    """GET, HEAD and OPTIONS read no body: one sent anyway must not pass for the connection's next request."""
    smuggled = b"GET /info HTTP/1.1\r\nHost: localhost\r\n\r\n"
    head = method + b" /health HTTP/1.1\r\nHost: localhost\r\n" + framing.replace(b"%d", b"%d" % len(smuggled))
    head += b"\r\n\r\n"
    reply = raw_reply(server, head + smuggled)
    assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1, reply[:300]
    assert b"Connection: close" in reply


def test_the_gradcam_switch_takes_yes_or_no_and_refuses_the_rest(server, synthetic):
    image = photo(synthetic)
    assert "gradcam_png" in predict(server, image, query="?gradcam")[1]
    assert "gradcam_png" not in predict(server, image, query="?gradcam=no")[1]
    status, answer = predict(server, image, query="?gradcam=maybe")
    assert status == 400 and "gradcam=maybe" in answer["error"]


def test_an_address_the_server_cannot_listen_on_is_one_line_before_the_model_loads(trained, monkeypatch, capsys):
    monkeypatch.setattr(serve, "Predictor", lambda *a, **k: pytest.fail("the model was loaded before listening"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--checkpoint", str(trained / "best.pt"), "--port", str(port)]) == 2
    assert serve.main(["--checkpoint", str(trained / "best.pt"), "--host", "10.255.255.1"]) == 2  # not this machine's
    taken_port, not_ours = capsys.readouterr().err.splitlines()
    assert f"127.0.0.1:{port}" in taken_port and "choose another --port" in taken_port
    assert "10.255.255.1" in not_ours and "check --host" in not_ours


def test_a_client_that_connects_while_the_model_loads_is_answered_once_it_is_ready(trained):
    with serve.make_server(None) as srv:  # listening, as serve.py is while it loads the model
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            early = pool.submit(request, srv, "GET", "/health")
            time.sleep(0.3)
            assert not early.done()  # waits in the listen queue: neither refused nor answered yet
            srv.predictor = serve.Predictor(trained / "best.pt", select_runtime("cpu"))
            with serving(srv):
                assert early.result(timeout=30) == (200, {"status": "ready", "model_loaded": True})


def test_a_client_that_asks_before_sending_is_refused_before_it_sends(server, synthetic):
    """`Expect: 100-continue`: a body the server would refuse is refused at once (413), not invited
    with 100 Continue; one it takes is invited, and answered."""
    head = POST_HEAD + b"Content-Type: image/jpeg\r\nExpect: 100-continue\r\n"
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(head + b"Content-Length: 50000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    image = photo(synthetic)
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(image))
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(image)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b'"probabilities"' in reply


def _answer_headers(srv, path, headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request("GET", path, None, headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}


def test_the_page_may_run_only_its_own_script_and_no_answer_is_cached_or_sniffed(server):
    """The page's policy names the SHA-256 of its own script and style, computed here independently,
    so an injected script cannot run (the browser test checks that it does not); JSON answers too are
    never cached or sniffed."""
    status, headers = _answer_headers(server, "/")
    policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    for tag in ("script", "style"):
        block = re.search(rf"<{tag}>(.*?)</{tag}>", serve.PAGE, re.S).group(1)
        assert policy[f"{tag}-src"] == f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    for path in ("/", "/info", "/no-such-path"):
        status, headers = _answer_headers(server, path)
        assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store", path


def test_info_answers_when_the_test_scores_hold_an_undefined_number(trained, tmp_path):
    """Older testing.py wrote the Mpox sensitivity of a network trained without Mpox as the token NaN:
    /info answered 500 ("Out of range float values are not JSON compliant"). Now it is null."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "best.pt", run / "best.pt")
    evaluate(run / "best.pt", rt=select_runtime("cpu"), resamples=20)
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    (run / "test" / "metrics.json").write_text(json.dumps(dict(metrics, mpox_sensitivity=float("nan"))))
    predictor = serve.Predictor(run / "best.pt", select_runtime("cpu"))
    with serving(serve.make_server(predictor)) as srv:
        status, text = request(srv, "GET", "/info", headers={"Accept": "application/json"})
    assert status == 200 and text["test"]["mpox_sensitivity"] is None
    assert text["test"]["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize("host,status", [("localhost", 200), ("localhost:8000", 200), ("127.0.0.1:1", 200),
                                         ("[::1]:8000", 200), ("app.localhost", 200), ("evil.example", 400),
                                         ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400), ("", 400)])
def test_a_loopback_server_answers_only_to_loopback_names(server, host, status):
    """DNS rebinding: a page at evil.example whose name is made to resolve to 127.0.0.1 would read
    the server as its own origin; the browser still sends Host: evil.example."""
    code, body = request(server, "GET", "/info", headers={"Host": host})
    assert code == status
    if status == 400:
        assert "answers only to localhost" in body["error"]


def test_a_server_listens_on_ipv6_loopback_as_on_ipv4(trained):
    """`--host ::1` (or `::`): the stdlib's server is IPv4 only and refused the address."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    predictor = serve.Predictor(trained / "best.pt", select_runtime("cpu"))
    with serving(serve.make_server(predictor, host="::1")) as srv:
        port = srv.server_address[1]
        assert request(srv, "GET", "/health", headers={"Host": f"[::1]:{port}"})[0] == 200
        assert request(srv, "GET", "/health", headers={"Host": "evil.example"})[0] == 400  # loopback rules
    assert serve.url_host("::1") == "[::1]" and serve.url_host("127.0.0.1") == "127.0.0.1"


def test_a_server_on_every_address_answers_to_any_name(trained):
    predictor = serve.Predictor(trained / "best.pt", select_runtime("cpu"))
    with serving(serve.make_server(predictor, host="0.0.0.0")) as srv:
        address = type("Address", (), {"server_address": ("127.0.0.1", srv.server_address[1])})
        assert request(address, "GET", "/health", headers={"Host": "lab-machine.example:8000"})[0] == 200
