"""Serve a trained classifier over HTTP with the standard library: a web page and a JSON API.

    python serve.py --checkpoint runs/lenet-fold1/best.pt          # http://127.0.0.1:8000/
    curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg 'http://127.0.0.1:8000/predict?gradcam=1'
    python serve.py --benchmark                                    # load test: requests/s, p50/p99 latency

Endpoints: GET / (the page), POST /predict (raw image body or multipart/form-data), GET /health,
GET /info. Requests are served by threads; one inference worker batches the requests waiting at
that moment (at most --max-batch, waiting at most --max-wait-ms for company) into one forward pass.
"""
import base64
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import hashlib
import http.client
import http.server
import io
import ipaddress
import json
import queue
import re
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse, urlsplit

import numpy as np
import torch

from getData import (DataError, ImageTooLarge, Number, Parser, UserError, load_image, prepare, refuse_unused,
                     run_main, to_json)
from gradcam import DISPLAY_SIZE, GradCAM, display_crop, overlay_png
from models import (MEMORY_FORMATS, PLAIN_VIEW, PRECISION_HELP, PRECISIONS, SCORES, TTA_VIEWS, ModelError,
                    capture_features, device_logits, find_checkpoint, gate, gate_by, load_classifier, probabilities,
                    reference_for, resize_size, select_runtime, view)

DEFAULTS = dict(checkpoint=None, runs="runs", host="127.0.0.1", port=8000, device="auto", precision="auto",
                memory_format="auto", threshold=0.6, tta=False, max_bytes=10 * 2**20, max_batch=16, max_wait_ms=5.0,
                timeout=10.0, deadline=30.0, max_connections=64, max_pixels=50_000_000, decode_mb=1024, ood_score=None,
                requests=256)
FLAG_VALUES = {"": True, "1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
TRUST_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "mpox_sensitivity", "ece")


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def newest_checkpoint(runs) -> Path:
    """The most recently written best.pt under `runs`, in no hidden folder (an overwritten run set
    aside, `.replaced-by-*`, or a notebook's `.ipynb_checkpoints`: not what a user has trained last)."""
    runs = Path(runs)
    found = sorted((p for p in runs.rglob("best.pt") if not any(d.startswith(".") for d in p.relative_to(runs).parts)),
                   key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if not found:
        raise ModelError(f"no trained checkpoint under {runs}/: run `python train.py` first, or pass --checkpoint")
    return found[-1]


# ----------------------------------------------------------------------------- inference worker
def model_facts(checkpoint: Path, ckpt: dict, digest: str) -> dict:
    """What a person should know about the model that answers: which one, and how well it scored on
    Valid (during training) and on Test (when testing.py has evaluated this very file)."""
    metric = ckpt.get("metric") or {}
    facts = dict(model=ckpt["model"], fold=ckpt.get("fold"), epoch=ckpt.get("epoch"), checkpoint=str(checkpoint),
                 checkpoint_id=digest, temperature=ckpt.get("temperature"),
                 valid={k: metric[f"valid_{s}"] for k, s in (("accuracy", "acc"), ("balanced_accuracy", "bal_acc"))
                        if f"valid_{s}" in metric}, test=None)
    # where testing.py writes: RUN/test/ for a run, RUN/test/foldK/ for a fold of a --fold all run
    for report in (checkpoint.parent / "test" / "metrics.json",
                   checkpoint.parent.parent / "test" / checkpoint.parent.name / "metrics.json"):
        try:
            m = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        if m.get("checkpoint_id") == digest and m.get("split") == "Test":
            facts["test"] = dict({k: m[k] for k in TRUST_KEYS if k in m}, n=m.get("n"), ci95=m.get("ci95"))
            break
    return facts


CLOSED = object()  # queued by Predictor.close after the last request


class Predictor:
    """Owns the model; a single worker thread turns queued requests into batched forward passes.
    Each answer (label, calibrated probabilities and, if asked, the Grad-CAM of the returned class)
    comes from one forward pass of its batch. `close()` (or leaving a `with` block) answers what was
    queued, then ends the thread, which lets the model go."""

    def __init__(self, checkpoint, rt, threshold=0.6, max_batch=16, max_wait_ms=5.0, tta=False, ood_score=None):
        model, ckpt = load_classifier(checkpoint, rt)
        self.model, self.classes, self.rt = model, ckpt["classes"], rt
        self.threshold, self.max_batch, self.max_wait = threshold, max_batch, max_wait_ms / 1000
        self.views, self.temperature = (TTA_VIEWS if tta else PLAIN_VIEW), ckpt.get("temperature") or 1.0
        self.data_root = ckpt["config"].get("data_root")
        self.needed_side = resize_size(max(model.input_size, DISPLAY_SIZE))  # uploads are decoded at least this big
        # None: no gate (an old checkpoint whose data is gone)
        self.ood = gate_by(reference_for(ckpt, model, rt, checkpoint), ood_score)
        digest = hashlib.sha1(Path(checkpoint).read_bytes()).hexdigest()[:12]
        ood = self.ood and dict(score=self.ood["score"], threshold=self.ood["thresholds"][self.ood["score"]],
                                keeps_of_valid=self.ood["keep"])
        self.info = dict(model_facts(Path(checkpoint), ckpt, digest), classes=self.classes,
                         input_size=model.input_size, threshold=threshold, tta=tta,
                         calibrated=bool(ckpt.get("temperature")), ood=ood)
        self.queue: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._loop, name="inference", daemon=True)
        self.worker.start()

    def submit(self, image, explain_it: bool = False) -> concurrent.futures.Future:
        """Queue one decoded image; with `explain_it` the answer carries its Grad-CAM too. Resizing
        happens here, in the request's thread, so preprocessing runs in parallel."""
        future = concurrent.futures.Future()
        size = self.model.input_size
        shown = display_crop(image, size) if explain_it else None
        self.queue.put((prepare(image, resize_size(size)), shown, future))
        return future

    def close(self) -> None:
        self.queue.put(CLOSED)
        self.worker.join()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _gather(self) -> list:
        """The next batch: what arrives within max_wait of its first request; empty once closed."""
        batch = [self.queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch and batch[-1] is not CLOSED:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
            except queue.Empty:
                break
        if batch[-1] is CLOSED:
            batch.pop()
            self.queue.put(CLOSED)  # the batch before it is answered first
        return batch

    def _loop(self):
        while batch := self._gather():
            try:
                results = self._run(batch)
                for (_, _, future), result in zip(batch, results):
                    future.set_result(result)
            except Exception as e:  # hand the failure to every waiting request; the worker lives on
                for _, _, future in batch:
                    future.set_exception(e)

    def _run(self, batch) -> list[dict]:
        """One pass per view for the whole batch. With Grad-CAM asked for, the plain view's pass runs
        with hooks and the map explains the class the answer returns (after views and temperature).
        Everything stays on the device until the one copy of probabilities and maps to the host."""
        start = time.perf_counter()
        x = torch.stack([x for x, _, _ in batch]).to(self.rt.device)
        size, maps = self.model.input_size, None
        with capture_features(self.model) as features:  # the plain view's come first
            if any(shown is not None for _, shown, _ in batch):
                with GradCAM(self.model) as cam:
                    plain = cam.forward(view(x, size), self.rt)
                    logits = plain.detach()[None]
                    if len(self.views) > 1:  # the other test-time views need no graph
                        logits = torch.cat([logits, device_logits(self.model, x, self.rt, len(x), self.views[1:])])
                    probs = probabilities(logits, self.temperature)
                    maps = cam.maps(plain, probs.argmax(1)).cpu().numpy()
            else:
                logits = device_logits(self.model, x, self.rt, len(x), self.views)
                probs = probabilities(logits, self.temperature)
        score, kept = gate(self.ood, features[0], logits[0]) if self.ood else (probs[:, 0] * torch.nan,) * 2
        host = torch.cat([probs, score[:, None], kept[:, None].float()], 1).cpu().numpy()  # one copy to the host
        ms = 1000 * (time.perf_counter() - start)
        return [dict(probs=row[:-2], ood_score=None if np.isnan(row[-2]) else float(row[-2]),
                     in_distribution=None if np.isnan(row[-1]) else bool(row[-1]), batch_size=len(batch),
                     inference_ms=ms, cam=maps[i] if maps is not None and shown is not None else None, shown=shown)
                for i, (row, (_, shown, _)) in enumerate(zip(host, batch))]

    def answer(self, result: dict) -> dict:
        """The JSON answer. A photo the OOD gate turns away gets no label (null, with the reason); its
        probabilities stay for the curious."""
        p = result["probs"]
        if not np.isfinite(p).all():
            raise RequestError(500, "the model gave scores that are not numbers for this image (NaN or inf)")
        top = int(np.argmax(p))
        out = dict(label=self.classes[top], probability=float(p[top]),
                   probabilities={c: float(v) for c, v in zip(self.classes, p)},
                   confident=bool(p[top] >= self.threshold), threshold=self.threshold,
                   ood_score=result["ood_score"], in_distribution=result["in_distribution"],
                   model=self.info["model"], checkpoint_id=self.info["checkpoint_id"], batch_size=result["batch_size"])
        if result["in_distribution"] is False:
            gate_ = self.info["ood"]
            out.update(label=None, probability=None, confident=False, reason=(
                "this photo does not look like the skin photos the model was trained on (its "
                f"{gate_['score']} out-of-distribution score {result['ood_score']:.3f} is above "
                f"{gate_['threshold']:.3f}, within which {gate_['keeps_of_valid']:.0%} of the validation photos "
                "fall): no diagnosis is given"))
        if result["cam"] is not None and result["in_distribution"] is not False:  # PNG made in the request's thread
            out["gradcam_png"] = base64.b64encode(overlay_png(result["shown"], result["cam"])).decode()
        return out


# ----------------------------------------------------------------------------- HTTP
MAX_PARTS = 16  # multipart fields read before the image must have come (the page sends one)


# a part with a file name (filename*=: RFC 5987's non-ASCII form), or named image or file, quoted or not
FILE_PART = re.compile(r';\s*(filename\*?=|name="?(image|file)"?\s*(;|$))')


def image_from_multipart(body: bytes, content_type: str) -> bytes:
    """The one file part of a multipart/form-data body, in one linear pass over it: at most MAX_PARTS
    parts are looked at (a body of 190,000 tiny fields must not cost minutes of CPU), and a second
    file among them is refused (it was ignored: two photos sent, one answer, no word of which)."""
    boundary = next((v.strip().strip('"') for k, _, v in (f.strip().partition("=") for f in content_type.split(";"))
                     if k.lower() == "boundary"), "")
    if not boundary:
        raise RequestError(400, "malformed multipart body: no boundary in Content-Type")
    delimiter = b"--" + boundary.encode("latin-1")
    start, found = body.find(delimiter), None
    for _ in range(MAX_PARTS):
        if start < 0 or body[start + len(delimiter):start + len(delimiter) + 2] == b"--":
            break  # no (more) parts
        head_end = body.find(b"\r\n\r\n", start)
        end = body.find(b"\r\n" + delimiter, head_end)
        if head_end < 0 or end < 0:
            raise RequestError(400, "malformed multipart body: a part does not end")
        headers = body[start + len(delimiter):head_end].decode("latin-1").lower()
        disposition = next((h for h in headers.split("\r\n") if h.startswith("content-disposition:")), "")
        if FILE_PART.search(disposition) and end > head_end + 4:
            if found is not None:
                raise RequestError(400, "one photo per request: this body holds two or more; send each on its own")
            found = body[head_end + 4:end]
        start = end + 2
    else:
        if found is None:
            raise RequestError(400, f"multipart body: no image among its first {MAX_PARTS} parts")
    if found is None:
        raise RequestError(400, "malformed multipart body: no file part (send the image as field 'image')")
    return found


RETURN_BYTES = 8 * 2**20  # decoded bytes (a 2-megapixel PNG, five phone JPEGs at the scale decoded) between returns


def return_freed_memory() -> None:
    """glibc keeps what is freed in per-thread heaps for the next allocation: a server decoding large
    uploads, one per connection thread, grew as if it decoded them all at once (measured: 323 MB for a
    200 MB budget, tests/test_serve.py). malloc_trim hands the freed pages back. Not after every
    upload: the inference thread's tensors are freed memory too, faulted in again after each return
    (as a fixed mmap threshold made every large tensor a fresh mapping: about 30% fewer requests a
    second at 4 and 16 clients on CPU, README: Web service)."""
    trim = _malloc_trim()
    if trim:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (macOS, musl): its allocator is left as it is


class Busy(Exception):
    """The decode budget is spent: answered 503 with Retry-After."""


class DecodeBudget:
    """The bytes that image decoding may hold at once (--decode-mb). A request whose image would not
    fit waits a moment for others to finish, then is answered 503: memory stays bounded however
    many large uploads arrive together (each is reserved its decoded size, getData.decoded_bytes).
    Whenever the decodes ended since the last time add up to RETURN_BYTES, the memory they freed goes
    back to the system (return_freed_memory)."""

    def __init__(self, nbytes: int, wait_s: float = 2.0):
        self.total, self.free, self.wait_s, self.unreturned = nbytes, nbytes, wait_s, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int):
        if nbytes > self.total:
            raise ImageTooLarge(f"upload: decoding it takes {nbytes / 2**20:.0f} MB, over the server's "
                                f"{self.total / 2**20:.0f} MB decode budget; send a smaller photo")
        with self.cond:
            if not self.cond.wait_for(lambda: self.free >= nbytes, timeout=self.wait_s):
                raise Busy()
            self.free -= nbytes
        try:
            yield
        finally:
            with self.cond:
                self.free += nbytes
                self.unreturned += nbytes
                due = self.unreturned >= RETURN_BYTES
                if due:
                    self.unreturned = 0
                self.cond.notify_all()
            if due:
                return_freed_memory()


class DeadlineReader(io.RawIOBase):
    """A socket read with a deadline for the whole request, not per read: a client sending a byte a
    second is cut off when its request's time is up (the per-read --timeout alone never fires)."""

    def __init__(self, sock: socket.socket, per_read: float):
        self.sock, self.per_read, self.deadline = sock, per_read, float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than the server's deadline")
        self.sock.settimeout(min(left, self.per_read))
        return self.sock.recv_into(buffer)


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "mpox-lesion"
    protocol_version = "HTTP/1.1"
    # The standard library's default, HTTP/0.9, answers a request line it cannot accept (HTTP/2.0, HTTP/x)
    # with a bare body and no status line, which clients (curl) reject as garbage; nobody speaks 0.9
    default_request_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.predictor, self.limits = self.server.predictor, self.server.limits
        self.rfile.close()  # the socket stays open: our reader takes the place of the plain one
        self.reader = DeadlineReader(self.connection, self.limits.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.deadline = time.monotonic() + self.limits.deadline  # the next request, its wait included
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` asks whether to send the body: a body we would refuse is refused now,
        before the client sends a byte of it (the standard library says "continue" to any)."""
        try:
            if self.command == "POST":
                self._body_length()
        except RequestError as e:
            self._json(e.status, {"error": str(e)}, e.headers)
            return False
        return super().handle_expect_100()

    def log_message(self, fmt, *args):
        pass  # quiet; errors are answered to the client

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.connection.settimeout(self.limits.timeout)  # writing: the per-operation timeout again
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(body)), **SAFE_HEADERS,
                     **(headers or {})}.items():
            self.send_header(k, v)
        if status >= 400 or self._unread_body():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _unread_body(self) -> bool:
        """GET, HEAD and OPTIONS read no body; the bytes of one sent anyway would be read as the
        connection's next request (request smuggling, RFC 9112 6.3), so such a connection is closed."""
        return self.command != "POST" and ("Transfer-Encoding" in self.headers
                                           or self.headers.get("Content-Length", "0").strip() != "0")

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        # allow_nan=False: never the invalid JSON token NaN (answer() refuses non-finite scores first)
        self._send(status, to_json(obj).encode(), "application/json", headers)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (malformed request line, unknown method, header too
        long) as JSON like every other error, not its HTML page."""
        try:
            self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            self.close_connection = True

    def _guard(self, fn):
        try:
            try:
                self._check_host()
                fn()
            except RequestError as e:
                self._json(e.status, {"error": str(e)}, e.headers)
            except TimeoutError:
                self._json(408, {"error": "the request was not received within the server's deadline"})
            except Exception as e:  # a bug must not take the server down: answer 500 and carry on
                self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
                raise
        except OSError:  # the client went away before (or while) it was answered: nothing left to tell it
            self.close_connection = True

    def _check_host(self):
        """DNS rebinding: a web page whose name its owner makes resolve to 127.0.0.1 could read a
        loopback server as its own origin, but the browser still sends that name as Host. A server
        listening on loopback answers only to loopback names (a client without Host is no browser)."""
        host = self.headers.get("Host")
        if host is None or not self.server.loopback:
            return
        name = urlsplit("//" + host).hostname or ""
        try:
            ours = ipaddress.ip_address(name).is_loopback
        except ValueError:
            ours = name == "localhost" or name.endswith(".localhost")  # RFC 6761: always loopback
        if not ours:
            raise RequestError(400, f"Host {host[:100]!r}: this server listens on loopback and answers only to "
                                    "localhost, 127.0.0.1 or [::1] (serve.py --host 0.0.0.0 serves other names)")

    def do_GET(self):
        self._guard(self._get)

    do_HEAD = do_GET  # the same headers, no body (_send)

    def do_POST(self):
        self._guard(self._post)

    def do_OPTIONS(self):
        self._guard(self._options)

    def _options(self):
        path = urlparse(self.path).path
        allow = sorted(set().union(*ALLOWED.values())) if path == "*" else ALLOWED.get(path)  # *: the server's
        if allow is None:
            self._not_found()
        self._json(200, {"allow": allow}, {"Allow": ", ".join(allow)})

    def do_PUT(self):
        self._guard(self._not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def _not_found(self):
        raise RequestError(404, f"no such path: {urlparse(self.path).path}")

    def _not_allowed(self):
        path = urlparse(self.path).path
        if path not in ALLOWED:
            self._not_found()
        raise RequestError(405, f"{self.command} is not allowed on {path}; use {', '.join(ALLOWED[path])}",
                           {"Allow": ", ".join(ALLOWED[path])})

    def _get(self):
        path = urlparse(self.path).path
        if path == "/":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_POLICY})
        elif path == "/health":
            self._json(200, {"status": "ready", "model_loaded": self.predictor.worker.is_alive()})
        elif path == "/info":
            self._json(200, dict(self.predictor.info, limits=self.limits.describe()))
        else:
            self._not_allowed()

    def _body_length(self) -> int:
        """The body's one length, if the body is one we take. A chunked body, or two lengths that
        disagree, would let the bytes after what we read pass for the connection's next request
        (request smuggling, RFC 9112 6.3): refused, and the connection closed with the error."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "Transfer-Encoding is not supported: send the body with a Content-Length")
        lengths = {v.strip(" \t") for v in self.headers.get_all("Content-Length") or []}  # around it: RFC 9110 5.5
        if not lengths:
            raise RequestError(411, "Content-Length is required")
        text = lengths.pop()
        if lengths or not (text.isascii() and text.isdigit()):  # isdigit alone takes '²'
            raise RequestError(400, "bad Content-Length")
        length = int(text)
        if length > self.limits.max_bytes:  # refused before a byte of the body is read
            raise RequestError(413, f"body of {length:,} bytes is over the {self.limits.max_bytes:,}-byte limit")
        if length == 0:
            raise RequestError(400, "empty body: send an image")
        return length

    def _read_body(self) -> bytes:
        length = self._body_length()
        body = self.rfile.read(length)
        if len(body) < length:
            raise RequestError(400, "body shorter than Content-Length")
        return body

    @staticmethod
    def _flag(query: str, name: str) -> bool:
        value = parse_qs(query, keep_blank_values=True).get(name, ["0"])[-1].lower()
        if value not in FLAG_VALUES:
            raise RequestError(400, f"{name}={value[:20]}: use {name}=1 or {name}=0")
        return FLAG_VALUES[value]

    def _post(self):
        url = urlparse(self.path)
        if url.path != "/predict":
            self._not_allowed()
        started, gradcam = time.perf_counter(), self._flag(url.query, "gradcam")
        ctype = self.headers.get("Content-Type", "")
        kind = ctype.split(";")[0].strip().lower()
        if not (kind.startswith("image/") or kind in ("application/octet-stream", "multipart/form-data")):
            raise RequestError(415, f"Content-Type {kind or '(none)'}: send image/jpeg, image/png, ... "
                                    "or multipart/form-data")
        body = self._read_body()
        data = image_from_multipart(body, ctype) if kind == "multipart/form-data" else body
        del body
        image = self._decode(data)
        result = self.predictor.submit(image, explain_it=gradcam).result()
        answer = self.predictor.answer(result)
        answer["timing_ms"] = dict(total=1000 * (time.perf_counter() - started), inference=result["inference_ms"])
        self._json(200, answer)

    def _decode(self, data: bytes):
        """The upload as a small RGB image: decoded at the scale the model needs, within the budget."""
        try:
            return load_image(data, name="upload", max_pixels=self.limits.max_pixels,
                              shrink_to=self.predictor.needed_side, budget=self.limits.budget)
        except ImageTooLarge as e:
            raise RequestError(413, str(e)) from None
        except DataError as e:
            raise RequestError(400, str(e)) from None
        except Busy:
            raise RequestError(503, "the server is decoding other large images; try again in a second",
                               {"Retry-After": "1"}) from None


ALLOWED = {"/": ["GET", "HEAD", "OPTIONS"], "/health": ["GET", "HEAD", "OPTIONS"],
           "/info": ["GET", "HEAD", "OPTIONS"], "/predict": ["POST", "OPTIONS"]}


@dataclass
class Limits:
    """What one client may cost the server, and what it gets when it asks for more (README: Web service)."""
    max_bytes: int = DEFAULTS["max_bytes"]  # body size: 413 before reading it
    max_pixels: int = DEFAULTS["max_pixels"]  # declared image size: 413 before decoding it
    decode_mb: int = DEFAULTS["decode_mb"]  # memory of the images being decoded at once: 503 + Retry-After
    max_connections: int = DEFAULTS["max_connections"]  # open connections: 503 + Retry-After
    deadline: float = DEFAULTS["deadline"]  # seconds for a whole request, headers and body: 408, closed
    timeout: float = DEFAULTS["timeout"]  # seconds a single read or write may stall: closed
    budget: DecodeBudget = field(init=False)

    def __post_init__(self):
        self.budget = DecodeBudget(self.decode_mb * 2**20)

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("max_bytes", "max_pixels", "decode_mb", "max_connections", "deadline",
                                              "timeout")}


def url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets (RFC 3986)."""
    return f"[{host}]" if ":" in host else host


def make_server(predictor: Predictor | None, host="127.0.0.1", port=0, limits: Limits | None = None) -> "Server":
    """Listening at once; it answers once serve_forever runs, with `server.predictor` set by then."""
    return Server((host, port), predictor, limits or Limits())


class Server(http.server.ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` of them: the next is answered 503."""
    daemon_threads = True
    # The stdlib's listen backlog of 5 drops bursts of connections, and each dropped SYN costs the
    # client a 1 s retransmit: p99 latency of 1 s at 16 concurrent clients. Queue them instead.
    request_queue_size = 128
    BUSY_BODY = b'{"error": "too many connections; try again in a second"}'
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))

    def __init__(self, address, predictor: Predictor | None, limits: Limits):
        # the stdlib's server is IPv4 only: an IPv6 address (::1, or :: for every interface) needs its family
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.predictor, self.limits = predictor, limits
        self.loopback = ipaddress.ip_address(self.server_address[0]).is_loopback
        self.slots = threading.BoundedSemaphore(limits.max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(self.BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that left is not news
            super().handle_error(request, client_address)


# ----------------------------------------------------------------------------- load test
def _post(host, port, body, timeout=60) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}")
    return time.perf_counter() - start


def load_test(predictor: Predictor, images: list[bytes], requests=64, concurrencies=(1, 4, 16)) -> list[dict]:
    server = make_server(predictor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    rows = []
    try:
        _post(host, port, images[0])  # warm-up
        for c in concurrencies:
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                lat = sorted(pool.map(lambda i: _post(host, port, images[i % len(images)]), range(requests)))
            wall = time.perf_counter() - start
            rows.append(dict(concurrency=c, requests_per_s=requests / wall, p50_ms=1000 * statistics.median(lat),
                             p99_ms=1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]))
    finally:
        server.shutdown()
        server.server_close()
    return rows


@torch.no_grad()
def bare_forward_ms(predictor: Predictor, batch: int, repeats=10) -> float:
    rt, model = predictor.rt, predictor.model
    x = torch.randn(batch, 3, model.input_size, model.input_size, device=rt.device)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    rt.forward(model, x)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        rt.forward(model, x)
    sync()
    return 1000 * (time.perf_counter() - start) / repeats


def benchmark(args, predictor: Predictor) -> None:
    root = predictor.data_root
    files = sorted(Path(root).rglob("*.jpg"))[:32] if root and Path(root).is_dir() else []
    if not files:
        raise DataError("--benchmark needs the checkpoint's dataset on disk to send real photos")
    images = [f.read_bytes() for f in files]
    rows = load_test(predictor, images, args.requests)
    print(f"\nserve.py load test: {predictor.info['model']} on {predictor.rt.device}, "
          f"{args.requests} requests per row, "
          f"max batch {predictor.max_batch}, max wait {1000 * predictor.max_wait:.0f} ms")
    print(f"{'concurrency':>12}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for r in rows:
        print(f"{r['concurrency']:>12}{r['requests_per_s']:>12.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    for b in (1, predictor.max_batch):
        print(f"bare model forward, batch {b:>2}: {bare_forward_ms(predictor, b):.2f} ms")


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    # Bounded above too: the socket and the batching queue take no wait longer than the OS's clock holds
    d, seconds = DEFAULTS, Number(float, 0, 86_400, open_low=True)  # up to a day
    p = Parser(__doc__, __file__)
    p.add_argument("--checkpoint", default=d["checkpoint"],
                   help="a best.pt or a run directory holding one (default: the newest under runs/)")
    p.add_argument("--host", default=d["host"], help="127.0.0.1 (this machine only) or 0.0.0.0 (the network); "
                   "IPv6: ::1 or ::")
    p.add_argument("--port", type=Number(int, 0, 65535), default=d["port"], help="0: any free port")
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=d["precision"], choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--memory-format", default=d["memory_format"], choices=MEMORY_FORMATS)
    p.add_argument("--threshold", type=Number(float, 0, 1), default=d["threshold"],
                   help="confidence warning below this")
    p.add_argument("--tta", action="store_true", help=f"average {len(TTA_VIEWS)} test-time views per photo")
    p.add_argument("--ood-score", default=d["ood_score"], choices=SCORES,
                   help="no diagnosis beyond this out-of-distribution score's threshold (default: the checkpoint's)")
    p.add_argument("--max-batch", type=Number(int, 1), default=d["max_batch"], help="images per forward pass")
    p.add_argument("--max-wait-ms", type=Number(float, 0, 60_000), default=d["max_wait_ms"],
                   help="how long a request waits for others to share its forward pass")
    limits = p.add_argument_group("what one client may cost (README: Web service)")
    limits.add_argument("--max-bytes", type=Number(int, 1), default=d["max_bytes"], help="largest upload (413)")
    limits.add_argument("--max-pixels", type=Number(int, 1), default=d["max_pixels"],
                        help="largest declared image (413)")
    limits.add_argument("--decode-mb", type=Number(int, 1), default=d["decode_mb"],
                        help="memory for the images being decoded at once (503 + Retry-After beyond)")
    limits.add_argument("--max-connections", type=Number(int, 1), default=d["max_connections"],
                        help="open connections (503 + Retry-After beyond)")
    limits.add_argument("--deadline", type=seconds, default=d["deadline"],
                        help="seconds for a whole request, headers and body (408 and closed beyond)")
    limits.add_argument("--timeout", type=seconds, default=d["timeout"],
                        help="seconds a single read or write may stall before the client is dropped")
    p.add_argument("--benchmark", action="store_true", help="run the load test instead of serving")
    p.add_argument("--requests", type=Number(int, 1), default=d["requests"],
                   help="load test: requests per concurrency level")
    return p.parse_args(argv)


def run(args) -> None:
    if not args.benchmark:  # it was ignored without a word
        refuse_unused(args, DEFAULTS, ["requests"], "is the load test's: use it with --benchmark")
    checkpoint = find_checkpoint(args.checkpoint) if args.checkpoint else newest_checkpoint(DEFAULTS["runs"])
    rt = select_runtime(args.device, args.precision, args.memory_format)
    load = functools.partial(Predictor, checkpoint, rt, args.threshold, args.max_batch, args.max_wait_ms, args.tta,
                             args.ood_score)
    if args.benchmark:
        with load() as predictor:
            benchmark(args, predictor)
        return
    limits = Limits(**{k: getattr(args, k) for k in Limits().describe()})
    try:  # before the model loads: a port in use is refused at once, not after a large network is read
        server = make_server(None, args.host, args.port, limits)
    except OSError as e:  # port taken, address not ours
        hint = "choose another --port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "check --host"
        raise UserError(f"cannot listen on {url_host(args.host)}:{args.port} ({e.strerror or e}); {hint}") from None
    with server:  # closes the socket however this ends
        server.predictor = load()  # connections made meanwhile wait in the listen queue
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, SIGTERM: how a server is stopped, a normal end
            print(f"serving {checkpoint} ({server.predictor.info['model']}) on "
                  f"http://{url_host(args.host)}:{server.server_address[1]}/", flush=True)
            server.serve_forever()


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Skin lesion check</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:640px;margin:0 auto;padding:1rem;color:#222}
 h1{font-size:1.3rem}
 #drop{display:block;border:2px dashed #888;border-radius:12px;padding:1.5rem;text-align:center;cursor:pointer}
 #drop.over{background:#eef} img{max-width:100%;border-radius:8px}
 .row{display:flex;align-items:center;gap:.5rem;margin:.2rem 0}
 .name{width:7.5rem;font-size:.9rem} .bar{flex:1;background:#eee;border-radius:4px;height:1rem}
 .fill{display:block;background:#3a7;height:100%;border-radius:4px} .pct{width:3.5rem;text-align:right;font-size:.9rem}
 #warn{background:#fff3cd;border:1px solid #e0c060;padding:.6rem;border-radius:8px;display:none}
 #error{color:#b00} .pics{display:grid;grid-template-columns:1fr 1fr;gap:.5rem;margin-top:1rem}
 figure{margin:0} figure img{width:100%;aspect-ratio:1;object-fit:cover}
 figcaption{font-size:.8rem;color:#555;text-align:center}
 #ood{background:#fde2e1;border:1px solid #d9827d;padding:.6rem;border-radius:8px}
 small{color:#666}
 #model{font-size:.85rem;color:#444;background:#f6f6f6;border-radius:8px;padding:.5rem .7rem;margin-bottom:1rem}
</style></head><body>
<h1>Skin lesion check</h1>
<p><small>A research model, not a diagnosis. See a clinician about any lesion that worries you.</small></p>
<div id="model">Loading the model's facts...</div>
<label id="drop">Choose or drop a photo of the lesion
 <input id="file" type="file" accept="image/*" hidden></label>
<p id="error"></p>
<div id="result" hidden>
 <h2 id="label"></h2>
 <p id="ood" hidden>This photo does not look like the skin photos the model was trained on, so it gives
  no diagnosis. Send a close, well-lit photo of the skin lesion itself.</p>
 <p id="warn">Low confidence: the model is unsure about this photo.</p>
 <details id="more"><summary>The model's probabilities, for the curious (not a diagnosis)</summary></details>
 <div id="bars"></div>
 <div class="pics">
  <figure><img id="photo" alt="your photo"><figcaption>Your photo</figcaption></figure>
  <figure id="camfig"><img id="cam" alt="Grad-CAM: where the model looked">
   <figcaption>Where the model looked (Grad-CAM, over the square it saw)</figcaption></figure>
 </div>
</div>
<script>
const $ = id => document.getElementById(id);
const pct = v => (100 * v).toFixed(1) + "%";
function scores(s) {
  const ci = s.ci95 && s.ci95.accuracy ? " (95% CI " + s.ci95.accuracy.map(pct).join("-") + ")" : "";
  return "accuracy " + pct(s.accuracy) + ci
    + ", balanced accuracy " + pct(s.balanced_accuracy)
    + (s.mpox_sensitivity != null ? ", Mpox sensitivity " + pct(s.mpox_sensitivity) : "");
}
fetch("/info").then(r => r.json()).then(i => {
  const lines = ["Answered by " + i.model + (i.fold ? ", trained on fold " + i.fold : "") + " (checkpoint "
    + i.checkpoint_id + (i.epoch ? ", epoch " + i.epoch : "") + ")."];
  if (i.valid && i.valid.accuracy !== undefined) lines.push("Validation: " + scores(i.valid) + ".");
  lines.push(i.test ? "Test (" + i.test.n + " photos): " + scores(i.test) + "."
                    : "Test: not evaluated yet (run testing.py on this checkpoint).");
  lines.push(i.calibrated ? "Probabilities are calibrated (temperature " + i.temperature.toFixed(2) + ")."
                          : "Probabilities are not calibrated.");
  lines.push(i.ood ? "Photos unlike its training photos get no diagnosis (" + i.ood.score + " distance above "
                     + i.ood.threshold.toFixed(3) + ")." : "No check for photos unlike its training photos.");
  $("model").replaceChildren(...lines.map(t => {
    const p = document.createElement("div"); p.textContent = t; return p; }));
}).catch(e => { $("model").textContent = "model facts unavailable: " + e; });
async function send(file) {
  $("error").textContent = ""; $("result").hidden = true;
  $("photo").src = URL.createObjectURL(file);
  try {
    const r = await fetch("/predict?gradcam=1", {method: "POST", body: file,
      headers: {"Content-Type": file.type || "application/octet-stream"}});
    const a = await r.json();
    if (!r.ok) { $("error").textContent = a.error || ("HTTP " + r.status); return; }
    const unlike = a.in_distribution === false;  // no label: the photo is not like the training photos
    $("label").textContent = unlike ? "No diagnosis" : a.label + " (" + (100 * a.probability).toFixed(1) + "%)";
    $("ood").hidden = !unlike;
    $("warn").style.display = a.confident || unlike ? "none" : "block";
    const more = $("more"), bars = $("bars");
    more.hidden = !unlike; more.open = false;
    if (unlike) more.appendChild(bars); else more.after(bars);  // collapsed under "for the curious"
    bars.replaceChildren(...Object.entries(a.probabilities).sort((x, y) => y[1] - x[1]).map(([c, p]) => {
      const row = document.createElement("div"); row.className = "row";
      row.innerHTML = '<span class="name"></span><span class="bar"><span class="fill"></span></span>'
                    + '<span class="pct"></span>';
      row.children[0].textContent = c; row.querySelector(".fill").style.width = (100 * p) + "%";
      row.children[2].textContent = (100 * p).toFixed(1) + "%"; return row; }));
    $("camfig").hidden = !a.gradcam_png;
    if (a.gradcam_png) $("cam").src = "data:image/png;base64," + a.gradcam_png;
    $("result").hidden = false;
  } catch (e) { $("error").textContent = "request failed: " + e; }
}
$("file").addEventListener("change", e => e.target.files[0] && send(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
</script></body></html>
"""


def _sha256(tag: str) -> str:
    """The CSP source of the page's one inline <tag> block: its SHA-256 (CSP Level 2)."""
    block = PAGE.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


# The page runs its own script and style and nothing else (an injected one would not run), fetches
# only this server, shows only the chosen photo (blob:) and the map (data:), and may not be framed.
PAGE_POLICY = (f"default-src 'none'; script-src {_sha256('script')}; style-src {_sha256('style')}; "
               "img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Every answer: never cached (a photo's diagnosis is private), never sniffed as another type, no referrer.
SAFE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


if __name__ == "__main__":
    raise SystemExit(main())
