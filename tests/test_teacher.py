"""`python -m dsbs_jax.teacher` against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import collections
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sentencepiece as spm

from dsbs_jax import teacher
from dsbs_jax.data import cache, parsing
from dsbs_jax.data.official import DATASETS

REPO = Path(__file__).resolve().parents[1]
MODEL = "fake-llm"


def cqa_answer(question: str, choice: str = "c", label: str = "wooded area", k: int = 0) -> str:
    """A continuation in the official style: rationale, answer, then a run-on exemplar."""
    return (
        f" About {question} (sample {k}), beavers live by streams in woods. "
        f"So the answer is ({choice}) {label}.\n\nQ: Where is a pen?\nAnswer Choices:\n(a) desk"
    )


@dataclasses.dataclass
class Reply:
    texts: list[str] = dataclasses.field(default_factory=list)
    status: int = 200
    body: bytes | None = None  # sent as is instead of an OpenAI response built from `texts`
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0


Script = Callable[[str, int], Reply]  # (question, attempt number for it) -> reply


def healthy(question: str, attempt: int) -> Reply:
    return Reply([cqa_answer(question)])


def question_of(body: dict) -> str:
    prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
    return prompt.rsplit("Q: ", 1)[1].removesuffix("\nA:")


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = fake.handle(self.path, dict(self.headers), body)
        time.sleep(reply.delay)
        if reply.body is None:
            chat = "messages" in body
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}}
                if chat
                else {"index": i, "text": t}
                for i, t in enumerate(reply.texts)
            ]
            payload = json.dumps({"object": "completion", "choices": choices}).encode()
        else:
            payload = reply.body
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (a timeout test)
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    block_on_close = False  # do not wait for deliberately slow handlers


class FakeOpenAI:
    """Serves scripted completions and records every request it gets."""

    def __init__(self, script: Script):
        self.script = script
        self.requests: list[dict] = []
        self.attempts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
        self._thread.start()

    def handle(self, path: str, headers: dict, body: dict) -> Reply:
        question = question_of(body)
        with self._lock:
            attempt = self.attempts[question]
            self.attempts[question] += 1
            self.requests.append(
                {"time": time.monotonic(), "path": path, "headers": headers, "body": body}
            )
        return self.script(question, attempt)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def serve():
    servers: list[FakeOpenAI] = []

    def start(script: Script = healthy) -> FakeOpenAI:
        servers.append(FakeOpenAI(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def write_dataset(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "data.jsonl"
    rows = [{"id": f"q{i}", "input": f"question {i}", "label": "wooded area"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(tmp_path: Path, server: FakeOpenAI, n: int, *extra: str) -> list[str]:
    return [
        "--dataset",
        str(write_dataset(tmp_path, n)),
        "--prompt",
        "cqa",
        "--endpoint",
        server.url,
        "--model",
        MODEL,
        "--out",
        str(tmp_path / "cache"),
        "--timeout",
        "2",
        "--backoff",
        "0.01",
        *extra,
    ]


def cached(tmp_path: Path) -> dict[str, cache.TeacherRecord]:
    records = cache.read_records(tmp_path / "cache" / "train.jsonl")  # raises on duplicates
    return {r.id: r for r in records}


def test_one_parsed_record_per_example(tmp_path, serve, capsys):
    def script(question: str, attempt: int) -> Reply:
        if question == "question 4":
            return Reply(["Beavers like water, I think.\n\nQ: Next?"])
        return Reply([cqa_answer(question)])

    server = serve(script)
    assert teacher.main(args(tmp_path, server, 5, "--max-tokens", "64", "--stop", "\n\nQ:")) == 0
    records = cached(tmp_path)
    assert sorted(records) == [f"q{i}" for i in range(5)]
    r = records["q2"]
    assert r.rationales == ("About question 2 (sample 0), beavers live by streams in woods.",)
    assert (r.teacher_label, r.parse_ok, r.parse_status, r.teacher) == (
        "wooded area",
        True,
        "ok",
        MODEL,
    )
    assert (r.input, r.label) == ("question 2", "wooded area")
    bad = records["q4"]
    assert (bad.parse_ok, bad.parse_status, bad.rationales) == (False, "no_answer_marker", ())
    assert len(server.requests) == 5
    request = server.requests[0]
    assert request["path"] == "/v1/completions"
    body = request["body"]
    assert (body["model"], body["n"], body["temperature"], body["max_tokens"]) == (MODEL, 1, 0, 64)
    assert body["stop"] == ["\n\nQ:"]
    assert body["prompt"].startswith("Q: Where would you keep a carton of milk")
    assert "4 parsed, 1 unparseable), 0 failed" in capsys.readouterr().out


def test_samples_give_rationales_and_majority_label_over_chat(tmp_path, serve):
    def script(question: str, attempt: int) -> Reply:
        return Reply(
            [
                cqa_answer(question, "b", "river", 0),
                cqa_answer(question, "c", "wooded area", 1),
                "No idea.",
                cqa_answer(question, "c", "wooded area", 3),
            ]
        )

    server = serve(script)
    extra = ("--chat", "--samples", "4", "--endpoint", server.url + "/v1")
    assert teacher.main(args(tmp_path, server, 2, *extra)) == 0
    r = cached(tmp_path)["q1"]
    assert r.teacher_label == "wooded area"
    assert len(r.rationales) == 3 and r.parse_ok
    body = server.requests[0]["body"]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert (body["n"], body["temperature"]) == (4, 0.7)
    assert body["messages"][0]["content"].endswith(f"Q: {question_of(body)}\nA:")


def test_majority_ties_go_to_the_first_and_nothing_parsed_keeps_first_status():
    example = teacher.Example("x", "question", "")
    parse = DATASETS["cqa"].parser
    tie = teacher.make_record(example, [cqa_answer("a", "b", "river"), cqa_answer("a")], parse, "m")
    assert tie.teacher_label == "river"
    hedge = "So the answer is (a) x or (b) y."
    none = teacher.make_record(example, ["no marker", hedge], parse, "m")
    assert (none.parse_ok, none.parse_status, none.rationales, none.teacher_label) == (
        False,
        parsing.NO_ANSWER_MARKER,
        (),
        "",
    )


def test_timeouts_429_500_and_bad_responses_are_retried(tmp_path, serve):
    first_failure = {
        "question 0": Reply(delay=1.5),  # beyond --timeout
        "question 1": Reply(status=429, headers={"Retry-After": "1"}, body=b"slow down"),
        "question 2": Reply(status=500, body=b"oops"),
        "question 3": Reply(body=b'{"choices": [{"text": "cut sho'),
        "question 4": Reply(body=b'{"choices": [{"message": "no text field"}]}'),
    }

    def script(question: str, attempt: int) -> Reply:
        if attempt == 0 and question in first_failure:
            return first_failure[question]
        return Reply([cqa_answer(question)])

    server = serve(script)
    assert teacher.main(args(tmp_path, server, 6, "--timeout", "0.5", "--concurrency", "6")) == 0
    assert sorted(cached(tmp_path)) == [f"q{i}" for i in range(6)]
    assert server.attempts == {f"question {i}": 2 for i in range(5)} | {"question 5": 1}
    times = [r["time"] for r in server.requests if question_of(r["body"]) == "question 1"]
    assert times[1] - times[0] >= 0.95  # Retry-After: 1 was respected


def test_failed_example_is_not_written_and_a_rerun_completes_it(tmp_path, serve, capsys):
    broken = {"on": True}

    def script(question: str, attempt: int) -> Reply:
        if question == "question 1" and broken["on"]:
            return Reply(status=503, body=b"overloaded")
        return Reply([cqa_answer(question)])

    server = serve(script)
    assert teacher.main(args(tmp_path, server, 4, "--retries", "2")) == 1
    assert sorted(cached(tmp_path)) == ["q0", "q2", "q3"]
    assert server.attempts["question 1"] == 3
    err = capsys.readouterr().err
    assert "error: 1 example(s) failed (after up to 2 retries)" in err and "HTTP 503" in err
    first = (tmp_path / "cache" / "train.jsonl").read_text()

    broken["on"] = False
    before = len(server.requests)
    assert teacher.main(args(tmp_path, server, 4, "--retries", "2")) == 0
    assert [question_of(r["body"]) for r in server.requests[before:]] == ["question 1"]
    assert sorted(cached(tmp_path)) == ["q0", "q1", "q2", "q3"]
    assert (tmp_path / "cache" / "train.jsonl").read_text().startswith(first)


def test_restart_skips_finished_ids(tmp_path, serve):
    server = serve()
    done = [
        cache.TeacherRecord(f"q{i}", f"question {i}", "", "x", ("r",), MODEL, True) for i in (0, 2)
    ]
    cache.write_records(tmp_path / "cache" / "train.jsonl", done)
    assert teacher.main(args(tmp_path, server, 4)) == 0
    assert sorted(question_of(r["body"]) for r in server.requests) == ["question 1", "question 3"]
    assert teacher.main(args(tmp_path, server, 4)) == 0
    assert len(server.requests) == 2
    records = cached(tmp_path)
    assert sorted(records) == ["q0", "q1", "q2", "q3"] and records["q0"].teacher_label == "x"


def test_torn_final_line_is_dropped_on_restart(tmp_path, serve, capsys):
    server = serve()
    path = tmp_path / "cache" / "train.jsonl"
    whole = cache.TeacherRecord("q0", "question 0", "", "x", ("r",), MODEL, True).to_json()
    torn = cache.TeacherRecord("q1", "question 1", "", "x", ("r",), MODEL, True).to_json()[:30]
    path.parent.mkdir()
    path.write_text(whole + "\n" + torn)
    assert teacher.main(args(tmp_path, server, 3)) == 0
    assert f"dropped a torn final line ({len(torn)} bytes)" in capsys.readouterr().err
    assert sorted(question_of(r["body"]) for r in server.requests) == ["question 1", "question 2"]
    assert path.read_text().startswith(whole + "\n" + '{"id": "q')
    assert sorted(cached(tmp_path)) == ["q0", "q1", "q2"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "train.jsonl"
    line = cache.TeacherRecord("q0", "in", "", "x", ("r",), MODEL, True).to_json()
    path.write_text(line)
    assert teacher.repair_torn_tail(path) == 0
    assert path.read_text() == line + "\n"
    path.write_bytes(path.read_bytes() + '{"id": "é'.encode()[:-1])  # cut inside a character
    assert teacher.repair_torn_tail(path) == len('{"id": "é'.encode()) - 1
    assert path.read_text() == line + "\n"


def test_sigkill_mid_run_loses_nothing_and_duplicates_nothing(tmp_path, serve):
    def slow(question: str, attempt: int) -> Reply:
        return Reply([cqa_answer(question)], delay=0.1)

    server = serve(slow)
    n = 30
    command = [sys.executable, "-m", "dsbs_jax.teacher", *args(tmp_path, server, n)]
    command += ["--concurrency", "2"]
    path = tmp_path / "cache" / "train.jsonl"
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and path.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = path.read_bytes()
    kept = before[: before.rfind(b"\n") + 1]
    written = kept.count(b"\n")
    assert 5 <= written < n

    server.script = healthy
    assert teacher.main(args(tmp_path, server, n)) == 0
    assert sorted(cached(tmp_path)) == sorted(f"q{i}" for i in range(n))
    assert path.read_bytes().startswith(kept)
    # Only the requests in flight at the kill (two workers, one result being written) repeat.
    assert len(server.requests) <= n + 3


def test_api_key_is_a_bearer_header_and_written_nowhere(tmp_path, serve, capsys, monkeypatch):
    secret = "sk-test-SECRET-4242"
    monkeypatch.setenv("TEACHER_KEY", secret)

    def script(question: str, attempt: int) -> Reply:
        if question == "question 1":  # an error body that echoes the key back
            return Reply(status=500, body=f"bad key {secret}".encode())
        return Reply([cqa_answer(question)])

    server = serve(script)
    code = teacher.main(args(tmp_path, server, 3, "--api-key-env", "TEACHER_KEY", "--retries", "1"))
    assert code == 1
    assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {secret}"}
    out, err = capsys.readouterr()
    assert "bad key ***" in err
    assert secret not in out + err
    for file in (tmp_path / "cache").iterdir():
        assert secret.encode() not in file.read_bytes()


def test_rate_limit_holds(tmp_path, serve):
    server = serve()
    start = time.monotonic()
    extra = ("--rate-limit", "10/s", "--concurrency", "8")
    assert teacher.main(args(tmp_path, server, 20, *extra)) == 0
    assert time.monotonic() - start >= 1.8
    times = sorted(r["time"] for r in server.requests)
    assert times[-1] - times[0] >= 1.8


def test_refused_key_stops_the_run(tmp_path, serve, capsys):
    server = serve(lambda question, attempt: Reply(status=401, body=b"invalid api key"))
    assert teacher.main(args(tmp_path, server, 20, "--concurrency", "2")) == 2
    err = capsys.readouterr().err
    assert "error: HTTP 401" in err and "invalid api key" in err
    assert len(server.requests) <= 4
    assert cached(tmp_path) == {}


@pytest.mark.parametrize(
    ("prompt_text", "message"),
    [("Q: no placeholder\nA:", "has no {input}"), ("Premise: {premise}\nA:", "q0")],
)
def test_bad_prompt_is_one_line_and_exit_2(tmp_path, serve, capsys, prompt_text, message):
    prompt = tmp_path / "mine.txt"
    prompt.write_text(prompt_text)
    argv = args(tmp_path, serve(), 2) + ["--prompt", str(prompt), "--parser", "cqa"]
    assert teacher.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()


def test_missing_dataset_and_unknown_parser_exit_2(tmp_path, serve, capsys):
    server = serve()
    argv = args(tmp_path, server, 1)
    argv[1] = str(tmp_path / "missing.jsonl")
    assert teacher.main(argv) == 2
    assert "no dataset file" in capsys.readouterr().err
    prompt = tmp_path / "mine.txt"
    prompt.write_text("Q: {input}\nA:")
    assert teacher.main(args(tmp_path, server, 1) + ["--prompt", str(prompt)]) == 2
    assert "pass --parser" in capsys.readouterr().err


def test_build_prompt_fills_nli_fields_and_leaves_braces_in_inputs():
    template = "Premise: {premise}\nHypothesis: {hypothesis}\nFull: {input}"
    text = "A {input} sign.</s>A sign."
    assert teacher.build_prompt(template, text) == (
        "Premise: A {input} sign.\nHypothesis: A sign.\nFull: A {input} sign.</s>A sign."
    )


@pytest.mark.parametrize(
    ("name", "marker"), [("cqa", "A:"), ("svamp", "A:"), ("esnli", "Explanation:"), ("anli1", "A:")]
)
def test_shipped_prompt_exemplars_parse_with_their_parser(name, marker):
    template = teacher.read_prompt(name)
    assert template.endswith(marker)
    answers = template.split(marker)[1:-1]
    assert len(answers) >= 3
    for answer in answers:
        assert DATASETS[name].parser(answer).ok, answer


def test_retry_delay_rate_and_url_helpers():
    policy = teacher.RetryPolicy(retries=3, backoff=0.5, max_delay=3.0)
    assert all(0.25 <= policy.delay(0) <= 0.5 for _ in range(50))
    assert all(1.0 <= policy.delay(2) <= 2.0 for _ in range(50))
    assert policy.delay(10) <= 3.0 and policy.delay(0, retry_after=2.0) >= 2.0
    assert teacher.parse_retry_after("2") == 2.0
    assert teacher.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert teacher.parse_retry_after("soon") is None
    assert teacher.parse_rate("600/m") == 10.0 and teacher.parse_rate("2.5") == 2.5
    with pytest.raises(Exception, match="10/s"):
        teacher.parse_rate("fast")
    assert teacher.completions_url("http://h:1/", chat=False) == "http://h:1/v1/completions"
    assert teacher.completions_url("http://h/v1", chat=True) == "http://h/v1/chat/completions"
    assert teacher.completions_url("http://h/x/completions", chat=True) == "http://h/x/completions"


def test_equation_samples_vote_by_value():
    example = teacher.Example("e1", "Tom has 8 apples and eats 3.", "( 8.0 - 3.0 )")
    texts = [
        "He has 8 - 3 = 5. The answer is (8-3).",
        "He has 2 + 2 = 4. The answer is (2 + 2).",
        "He has 8 - 3 = 5. The answer is (8 - 3).",
        "He has 2 + 2 = 4. The answer is (2+2).",
        "He has 8 minus 3. The answer is (8 - (3)).",
    ]
    record = teacher.make_record(example, texts, parsing.parse_equation, "m")
    assert record.teacher_label == "(8-3)"
    assert len(record.rationales) == 5
    assert teacher.majority_label(["(2+2)", "(1+3)", "(5)"], str) == "(2+2)"


def test_a_complete_run_writes_the_vocabulary_and_a_later_one_keeps_it(tmp_path, serve, capsys):
    def script(question: str, attempt: int) -> Reply:
        if question == "question 1" and attempt == 0:
            return Reply(status=503, body=b"overloaded")
        return Reply([cqa_answer(question)])

    server = serve(script)
    model = tmp_path / "cache" / "spm.model"
    assert teacher.main(args(tmp_path, server, 3, "--retries", "0")) == 1
    assert not model.exists()  # the train split is not complete yet
    assert teacher.main(args(tmp_path, server, 3, "--no-vocab")) == 0
    assert not model.exists()
    capsys.readouterr()
    assert teacher.main(args(tmp_path, server, 3)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote the vocabulary {model}"
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert processor.decode(processor.encode("question 2")) == "question 2"
    written = model.read_bytes()
    assert teacher.main(args(tmp_path, server, 4)) == 0  # one more input, the vocabulary stays
    assert (
        capsys.readouterr().out.splitlines()[-1].startswith(f"kept the existing vocabulary {model}")
    )
    assert model.read_bytes() == written
