"""`loraens serve` as a user reaches it: a real server process on a free local port, a real HTTP client.

One server (the tiny calibrated run) serves the whole module: well-formed answers that match the
offline ones, 100+ bad requests that must all get a 4xx with a message (never a 5xx), a bounded
load test (500 requests at concurrency 16: nothing dropped, every answer right, fewer forwards
than requests), and the UI page driven in headless Chromium (typing, a click, the bars, a screenshot).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bench.serve_load import bodies_from, run_load  # noqa: E402
from loraens.answer import load_answerer  # noqa: E402
from loraens.cli import build_parser  # noqa: E402
from loraens.serve import MAX_CHOICES, MAX_QUESTIONS  # noqa: E402

from .tiny_run import make_tiny_run  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, run: Path, log: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        import loraens

        src = str(Path(loraens.__file__).resolve().parent.parent)  # the loraens this test session imports
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        self._out = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "loraens", "serve", str(run), "--port", str(self.port),
                                      "--quiet", *extra], stdout=self._out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, _tiny_llama, tokenizer):
    return make_tiny_run(tmp_path_factory.mktemp("serve"), _tiny_llama, tokenizer)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = Server(tiny.run, tmp_path_factory.mktemp("serve-log") / "server.log")
    yield srv
    srv.stop()
    log = srv.log.read_text()
    assert "Traceback" not in log, f"the server logged a traceback:\n{log[-3000:]}"


@pytest.fixture(scope="module")
def questions(tiny) -> list[dict]:
    return [json.loads(line) for line in tiny.questions_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def expected(tiny, questions) -> dict[str, dict]:
    """The offline answers (the Python API in this process) to compare the server's with."""
    answerer = load_answerer(tiny.run)
    return {r["id"]: r for r in answerer.answer(questions)}


def _same_answer(got: dict, want: dict) -> None:
    assert got["answer_index"] == want["answer_index"] and got["answer_text"] == want["answer_text"]
    assert got["decision"] == want["decision"] and got["conformal_set"] == want["conformal_set"]
    for a, b in zip(got["member_probs"], want["member_probs"]):
        assert a == pytest.approx(b, abs=1e-4)
    assert got["probs"] == pytest.approx(want["probs"], abs=1e-4)
    assert set(got["uncertainty"]) == set(want["uncertainty"])


# ---------------------------------------------------------------- the API


def test_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "runs/x"])
    assert args.host == "127.0.0.1"


def test_health_describes_the_run(server):
    h = server.health()
    assert h["status"] == "ok" and h["members"] == 3 and h["calibrated"] is True
    assert h["calibration"]["risks"] == [0.5, 0.9] and h["calibration"]["alphas"] == [0.1, 0.2]
    assert h["limits"]["max_choices"] == MAX_CHOICES and "forwards" in h["counters"]


def test_predict_one_and_many_questions(server, questions, expected):
    one = httpx.post(f"{server.url}/predict",
                     json={"id": "u3", "question": questions[3]["question"], "choices": questions[3]["choices"]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["calibrated"] is True and len(body["answers"]) == 1
    _same_answer(body["answers"][0], expected["u3"])
    many = httpx.post(f"{server.url}/predict", json={"questions": questions}, timeout=60)
    assert many.status_code == 200, many.text
    answers = many.json()["answers"]
    assert [a["id"] for a in answers] == [q["id"] for q in questions]
    for a in answers:
        _same_answer(a, expected[a["id"]])
    # Per-request settings pick another stored rule.
    other = httpx.post(f"{server.url}/predict", json={"questions": questions[:2], "risk": 0.9, "alpha": 0.2,
                                                      "set": "aps"}).json()["answers"]
    assert {(a["rule"]["target"], a["conformal"]["alpha"], a["conformal"]["method"]) for a in other} == {(0.9, 0.2,
                                                                                                          "aps")}


def _bad_requests(questions: list[dict]) -> list[tuple[str, dict]]:
    """(name, httpx keyword arguments) of requests that must get a 4xx."""
    q = questions[0]
    good = {"question": q["question"], "choices": q["choices"]}
    J = lambda body: {"json": body}  # noqa: E731
    cases: list[tuple[str, dict]] = [
        ("no choices", J({"question": "why?"})),
        ("empty choices", J({"question": "why?", "choices": []})),
        ("one choice", J({"question": "why?", "choices": ["yes"]})),
        ("50 choices", J({"question": "why?", "choices": [f"c{i}" for i in range(50)]})),
        (f"{MAX_CHOICES + 1} choices", J({"question": "why?", "choices": [f"c{i}" for i in range(MAX_CHOICES + 1)]})),
        ("1 MB question", J({"question": "x" * 1_000_000, "choices": ["a", "b"]})),
        ("2 MB body", {"content": b'{"question": "' + b"y" * 2_000_000 + b'", "choices": ["a", "b"]}',
                       "headers": {"content-type": "application/json"}}),
        ("5000-character question", J({"question": "z " * 2500, "choices": ["a", "b"]})),
        ("2000-character choice", J({"question": "why?", "choices": ["a" * 2000, "b"]})),
        ("question is a number", J({"question": 42, "choices": ["a", "b"]})),
        ("question is null", J({"question": None, "choices": ["a", "b"]})),
        ("question is a list", J({"question": ["why?"], "choices": ["a", "b"]})),
        ("choices is a string", J({"question": "why?", "choices": "a,b"})),
        ("choices are numbers", J({"question": "why?", "choices": [1, 2]})),
        ("choices hold null", J({"question": "why?", "choices": ["a", None]})),
        ("choices hold an object", J({"question": "why?", "choices": ["a", {"text": "b"}]})),
        ("empty question", J({"question": "", "choices": ["a", "b"]})),
        ("blank question", J({"question": "   \n\t", "choices": ["a", "b"]})),
        ("empty choice", J({"question": "why?", "choices": ["a", ""]})),
        ("blank choice", J({"question": "why?", "choices": ["a", "   "]})),
        ("unknown field", J({**good, "temperature": 2})),
        ("id is a number", J({**good, "id": 7})),
        ("both shapes", J({**good, "questions": [good]})),
        ("no question at all", J({})),
        ("questions empty", J({"questions": []})),
        ("questions not a list", J({"questions": good})),
        ("questions hold a string", J({"questions": ["why?"]})),
        ("a bad question among good ones", J({"questions": [good, {"question": "x", "choices": ["only"]}]})),
        (f"{MAX_QUESTIONS + 1} questions", J({"questions": [good] * (MAX_QUESTIONS + 1)})),
        ("risk is text", J({**good, "risk": "low"})),
        ("risk above 1", J({**good, "risk": 1.5})),
        ("risk 0", J({**good, "risk": 0})),
        ("risk not calibrated", J({**good, "risk": 0.3})),
        ("alpha not calibrated", J({**good, "alpha": 0.05})),
        ("coverage not calibrated", J({**good, "coverage": 0.5})),
        ("risk and coverage", J({**good, "risk": 0.5, "coverage": 0.8})),
        ("unknown set method", J({**good, "set": "raps"})),
        ("body is a list", J([good])),
        ("body is a string", J("why?")),
        ("body is a number", J(3)),
        ("body is null", {"content": b"null", "headers": {"content-type": "application/json"}}),
        ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}),
        ("malformed JSON", {"content": b'{"question": "why?", "choices": ["a", "b"', "headers":
                            {"content-type": "application/json"}}),
        ("not UTF-8", {"content": b'{"question": "\xff\xfe", "choices": ["a", "b"]}',
                       "headers": {"content-type": "application/json"}}),
        ("NaN risk", {"content": b'{"question": "why?", "choices": ["a", "b"], "risk": NaN}',
                      "headers": {"content-type": "application/json"}}),
        ("deeply nested JSON", {"content": b"[" * 100_000 + b"]" * 100_000,
                                "headers": {"content-type": "application/json"}}),
        ("form-encoded body", {"data": {"question": "why?", "choices": "a"}}),
        ("plain text body", {"content": b"why?", "headers": {"content-type": "text/plain"}}),
    ]
    # Seeded mutations of a valid request: a field replaced by a value of a wrong type or shape.
    rng = random.Random(0)
    wrong = [None, 0, -1, 3.5, True, "", "x", [], [None], {}, {"a": 1}, ["a"], [[]], "A" * 5000]
    for i in range(80):
        body: dict = {"question": q["question"], "choices": list(q["choices"])}
        target = rng.choice(["question", "choices", "choice", "id", "risk", "alpha", "set", "questions"])
        value = rng.choice(wrong)
        if target == "choice":
            if value is not None and isinstance(value, str) and value.strip() and len(value) <= 1000:
                value = 17  # a non-empty short string would be a valid choice
            body["choices"][rng.randrange(len(body["choices"]))] = value
        elif target == "id":
            if isinstance(value, str) and len(value) <= 200 or value is None:
                value = 5
            body["id"] = value
        elif target == "questions":
            body = {"questions": value if not isinstance(value, list) or not value or value[0] != "a" else [1]}
            if body["questions"] is None:
                body["questions"] = 0
        else:
            if target in ("risk", "alpha") and isinstance(value, float) and 0 < value < 1:
                value = 2.0
            if target in ("risk", "alpha", "set") and value is None:
                value = "none"  # null is a valid "use the default"
            if target in ("question", "choices") and value is None:
                body.pop(target)
            else:
                body[target] = value
        cases.append((f"mutation {i}: {target} = {str(value)[:20]!r}", J(body)))
    return cases


def test_fuzzed_bad_requests_get_a_4xx_with_a_message_and_no_server_error(server, questions):
    cases = _bad_requests(questions)
    assert len(cases) >= 100
    before = server.health()["counters"]
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name, kwargs in cases:
            r = client.post("/predict", **kwargs)
            if not 400 <= r.status_code < 500:
                failures.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
                continue
            try:
                message = r.json().get("error") or r.json().get("detail")
            except ValueError:
                message = None
            if not message:
                failures.append(f"{name}: HTTP {r.status_code} without a message: {r.text[:200]}")
        other = [client.get("/predict"), client.post("/nowhere", json={}), client.delete("/health")]
    assert not failures, "\n".join(failures)
    assert [r.status_code for r in other] == [405, 404, 405]
    after = server.health()["counters"]
    assert after["forwards"] == before["forwards"], "a bad request reached the model"
    assert server.proc.poll() is None
    # A few messages a user reads: they name the field and the limit.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        one = client.post("/predict", json={"question": "why?", "choices": ["yes"]}).json()["error"]
        assert "choices" in one and "at least 2" in one
        many = client.post("/predict", json={"question": "why?", "choices": [str(i) for i in range(50)]}).json()
        assert "choices" in many["error"] and str(MAX_CHOICES) in many["error"]
        big = client.post("/predict", json={"question": "x" * 1_000_000, "choices": ["a", "b"]}).json()["error"]
        assert "question" in big and "4000" in big
        assert "not calibrated" in client.post("/predict", json={"question": "why?", "choices": ["a", "b"],
                                                                  "risk": 0.3}).json()["error"]


def test_load_500_requests_at_concurrency_16_are_all_answered_right_and_batched(server, questions, expected):
    bodies = bodies_from(questions, 500)
    result = asyncio.run(run_load(server.url, bodies, concurrency=16))
    print("\n" + result.summary())
    assert result.errors == [] and result.statuses == {200: 500}, result.errors[:5]
    for body, response in zip(bodies, result.responses):
        assert response is not None and len(response["answers"]) == 1
        got = response["answers"][0]
        assert got["id"] == body["id"]
        want = expected[questions[int(body["id"][1:]) % len(questions)]["id"]]
        _same_answer(got, want)
    assert result.forwards is not None and result.forwards < 500, f"no batching: {result.forwards} forwards"
    assert server.health()["counters"]["largest_batch"] > 1


# ---------------------------------------------------------------- the page, in a real browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class DevTools:
    """Chrome's DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-separated JSON)."""

    def __init__(self, browser: str, profile: Path, width: int = 1100, height: int = 900):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._buffer = b""

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError(f"no reply to {method} within {timeout} s")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed the pipe")
            self._buffer += chunk

    def eval(self, session: str, expression: str):
        out = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression[:80]}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(session, expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {timeout} s")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def ask_in_browser(url: str, question: str, choices: list[str], screenshot: Path, profile: Path,
                   rule: str | None = None) -> dict:
    """Open the page, type a question and its choices, click Ask, wait for the bars, take a screenshot.

    `rule`: an option of the decision-rule menu to pick first (e.g. "risk:0.2"), as a user would.
    """
    browser = _chromium()
    assert browser is not None
    tools = DevTools(browser, profile)
    try:
        target = tools.call("Target.createTarget", url=url)["targetId"]
        session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tools.call("Page.enable", session)
        tools.wait_for(session, "document.body && document.body.dataset.state === 'ready'")
        for field_id, text in (("question", question), ("choices", "\n".join(choices))):
            tools.eval(session, f"document.getElementById('{field_id}').focus()")
            tools.call("Input.insertText", session, text=text)  # typed, as a keyboard would
        if rule is not None:
            tools.eval(session, f"(() => {{ const s = document.getElementById('rule'); s.value = {json.dumps(rule)};"
                                " s.dispatchEvent(new Event('change')); })()")
        box = tools.eval(session, "(() => { const r = document.getElementById('submit').getBoundingClientRect();"
                                  " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            tools.call("Input.dispatchMouseEvent", session, type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        state = tools.wait_for(session, "['answered', 'error'].includes(document.body.dataset.state) && "
                                        "document.body.dataset.state")
        info = tools.eval(session, """(() => ({
            state: document.body.dataset.state, errors: document.body.dataset.errors,
            error: document.getElementById('error').textContent,
            decision: document.getElementById('decision').textContent,
            ensemble: Array.from(document.querySelectorAll('#ensemble .bar'))
                .map(b => [b.dataset.p, b.getBoundingClientRect().width]),
            member: document.querySelectorAll('#members .bar').length,
            members: document.querySelectorAll('#members h3').length,
            set: Array.from(document.querySelectorAll('#set span')).map(s => Number(s.dataset.choice)),
            scores: document.querySelectorAll('#scores tr').length,
            height: Math.ceil(document.documentElement.scrollHeight)}))()""")
        tools.call("Emulation.setDeviceMetricsOverride", session, width=1100, height=int(info["height"]) + 20,
                   deviceScaleFactor=1, mobile=False)
        shot = tools.call("Page.captureScreenshot", session, format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        info["state"] = state
        return info
    finally:
        tools.close()


def test_the_page_answers_a_typed_question_with_bars(server, tmp_path):
    if _chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser check: .ci/run installs Debian's chromium.")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    choices = ["red", "blue", "green", "black"]
    shot = tmp_path / "serve_page.png"
    info = ask_in_browser(server.url + "/", "what is the colour of the sky?", choices, shot, tmp_path / "profile")
    assert info["state"] == "answered", info["error"]
    assert info["errors"] == "0"
    assert len(info["ensemble"]) == 4 and info["members"] == 3 and info["member"] == 12
    widths = [w for _, w in info["ensemble"]]
    assert all(w > 0 for w in widths) and max(widths) > 20  # the bars render with their probabilities' widths
    probs = [float(p) for p, _ in info["ensemble"]]
    assert sum(probs) == pytest.approx(1, abs=1e-4)
    assert info["decision"].startswith(("Answer:", "Abstain:")) and info["scores"] >= 5
    assert all(0 <= i < 4 for i in info["set"])
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("LORAENS_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)
