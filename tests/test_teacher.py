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
from dsbs_jax.data import cache, official, parsing, prepare, records
from dsbs_jax.data.official import DATASETS
from tests.conftest import OFFICIAL_DATA, free_port, needs_official_data

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
    drop: bool = False  # close the connection without an answer


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
        if reply.drop:
            self.close_connection = True
            return
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
    no_marker = "Beavers like water, I think.\n\nQ: Next?"

    def script(question: str, attempt: int) -> Reply:
        if question == "question 4":
            return Reply([no_marker])
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
    # What the parser read, as `data prepare` keeps it: the whole text, without a label.
    assert (bad.parse_ok, bad.parse_status, bad.rationales, bad.teacher_label) == (
        False,
        "no_answer_marker",
        (no_marker,),
        "",
    )
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


def test_majority_ties_go_to_the_first_and_nothing_parsed_keeps_what_was_read():
    example = teacher.Example("x", "question", "")
    parse = DATASETS["cqa"].parser
    tie = records.make_record(example, [cqa_answer("a", "b", "river"), cqa_answer("a")], parse, "m")
    assert tie.teacher_label == "river"
    hedge = "So the answer is (a) x or (b) y."
    none = records.make_record(example, ["no marker", hedge], parse, "m")
    assert (none.parse_ok, none.parse_status, none.rationales, none.teacher_label) == (
        False,
        parsing.NO_ANSWER_MARKER,
        ("no marker",),
        "x",
    )
    hedged = "Clubs and gyms have courts. So the answer is (c) club or (d) gym."
    one = records.make_record(example, [hedged], parse, "m")
    assert (one.parse_ok, one.parse_status, one.rationales, one.teacher_label) == (
        False,
        parsing.MULTIPLE_ANSWERS,
        ("Clubs and gyms have courts.",),
        "club",
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


def kill_after_lines(command: list[str], path: Path, lines: int, seconds: float = 30) -> None:
    """Runs `command` and SIGKILLs it once `path` has `lines` lines; fails if it ends first."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and path.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.02)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert running, err


def test_sigkill_mid_run_loses_nothing_and_duplicates_nothing(tmp_path, serve):
    def slow(question: str, attempt: int) -> Reply:
        return Reply([cqa_answer(question)], delay=0.1)

    server = serve(slow)
    n = 30
    command = [sys.executable, "-m", "dsbs_jax.teacher", *args(tmp_path, server, n)]
    command += ["--concurrency", "2"]
    path = tmp_path / "cache" / "train.jsonl"
    kill_after_lines(command, path, 5)
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


SECRET = "sk-Q7vX9zKp2WmR4tJd"


def assert_no_part_of_key(text: str, key: str = SECRET) -> None:
    pieces = {key[i : i + teacher.REDACT_MIN_CHARS] for i in range(len(key) - 3)}
    assert not [piece for piece in pieces if piece in text]


def test_api_key_is_a_bearer_header_and_written_nowhere(tmp_path, serve, capsys, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", SECRET)

    def script(question: str, attempt: int) -> Reply:
        if question == "question 1":  # an error body that echoes the key back, whole and masked
            return Reply(
                status=500, body=f"bad key {SECRET}, you sent sk-****{SECRET[-4:]}".encode()
            )
        return Reply([cqa_answer(question)])

    server = serve(script)
    code = teacher.main(args(tmp_path, server, 3, "--api-key-env", "TEACHER_KEY", "--retries", "1"))
    assert code == 1
    assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
    out, err = capsys.readouterr()
    assert "bad key ***, you sent sk-******" in err
    assert_no_part_of_key(out + err)
    for file in (tmp_path / "cache").iterdir():
        assert_no_part_of_key(file.read_text())


@pytest.mark.parametrize("padding", ["\r", "\n", " \r\n"])
def test_key_ending_in_cr_or_lf_is_stripped_with_a_warning(
    tmp_path, serve, capsys, monkeypatch, padding
):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET + padding)
    server = serve()
    assert teacher.main(args(tmp_path, server, 2)) == 0
    assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: ignoring whitespace around the key in OPENAI_API_KEY"]
    assert_no_part_of_key(out + err)


@pytest.mark.parametrize("key", [SECRET + "\u2014x", "sk-Q7vX9\nzKp2WmR4tJd", "sk-Q7vX9\tzKp2"])
def test_key_a_header_cannot_carry_is_refused_naming_its_variable(
    tmp_path, serve, capsys, monkeypatch, key
):
    monkeypatch.setenv("TEACHER_KEY", key)
    server = serve()
    assert teacher.main(args(tmp_path, server, 2, "--api-key-env", "TEACHER_KEY")) == 2
    out, err = capsys.readouterr()
    assert err == (
        "error: TEACHER_KEY holds a character an HTTP header cannot carry (a non-Latin-1 or a "
        "control character); set it to the key alone\n"
    )
    assert server.requests == [] and not (tmp_path / "cache").exists()


def test_rate_limit_holds(tmp_path, serve):
    server = serve()
    start = time.monotonic()
    extra = ("--rate-limit", "10/s", "--concurrency", "8")
    assert teacher.main(args(tmp_path, server, 20, *extra)) == 0
    assert time.monotonic() - start >= 1.8
    times = sorted(r["time"] for r in server.requests)
    assert times[-1] - times[0] >= 1.8


def test_refused_key_stops_the_run(tmp_path, serve, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = serve(lambda question, attempt: Reply(status=401, body=b"invalid api key"))
    assert teacher.main(args(tmp_path, server, 20, "--concurrency", "2")) == 2
    err = capsys.readouterr().err
    assert "error: HTTP 401" in err and "invalid api key" in err and "unset" not in err
    assert len(server.requests) <= 4
    assert cached(tmp_path) == {}


@pytest.mark.parametrize(("status", "variable"), [(401, "OPENAI_API_KEY"), (403, "TEACHER_KEY")])
def test_refusal_without_a_key_names_the_unset_variable(
    tmp_path, serve, capsys, monkeypatch, status, variable
):
    monkeypatch.delenv(variable, raising=False)
    server = serve(lambda question, attempt: Reply(status=status, body=b"no key"))
    assert teacher.main(args(tmp_path, server, 4, "--api-key-env", variable)) == 2
    assert all("Authorization" not in r["headers"] for r in server.requests)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"error: HTTP {status} from {server.url}/v1/completions: no key "
        f"({variable} is unset or empty, so no key was sent)"
    ]


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
    record = records.make_record(example, texts, parsing.parse_equation, "m")
    assert record.teacher_label == "(8-3)"
    assert len(record.rationales) == 5
    assert records.majority_label(["(2+2)", "(1+3)", "(5)"], str) == "(2+2)"


MALFORMED_CHAT_BODIES = {
    "question 1": b'{"choices": [{"message": "text"}]}',
    "question 2": b'{"choices": [{"message": {"role": "assistant", "content": null}}]}',
    "question 3": b'{"choices": [{"message": {"content": ["a list"]}}]}',
    "question 4": b'{"choices": {"0": {"message": {"content": "a dict of choices"}}}}',
    "question 5": b'[{"choices": []}]',
    "question 6": b"<html>502 Bad Gateway</html>",
    "question 7": b"[" * 100_000,  # too deep for the JSON decoder
    "question 8": b"\xff\xfe not UTF-8",
}


def test_wrong_shaped_replies_are_failed_examples_without_a_traceback(tmp_path, serve):
    def script(question: str, attempt: int) -> Reply:
        if question in MALFORMED_CHAT_BODIES:
            return Reply(body=MALFORMED_CHAT_BODIES[question])
        return Reply([cqa_answer(question)])

    server = serve(script)
    argv = args(tmp_path, server, 10, "--chat", "--retries", "2", "--concurrency", "8")
    done = subprocess.run(
        [sys.executable, "-m", "dsbs_jax.teacher", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "error: 8 example(s) failed (after up to 2 retries)" in done.stderr
    assert sorted(cached(tmp_path)) == ["q0", "q9"]
    assert server.attempts == {q: 3 for q in MALFORMED_CHAT_BODIES} | {
        "question 0": 1,
        "question 9": 1,
    }


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (bound for a moment, then closed)."""
    return f"http://127.0.0.1:{free_port()}"


def test_unreachable_endpoint_stops_at_once(tmp_path, serve, capsys):
    url = closed_port_url()
    argv = args(tmp_path, serve(), 16, "--endpoint", url, "--backoff", "1", "--concurrency", "4")
    start = time.monotonic()
    assert teacher.main(argv) == 2
    assert time.monotonic() - start < 5  # no backoff: the first connections were refused at once
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: cannot connect to {url}/v1/completions: ")
    assert errors[0].endswith(
        "(the first 3 connections failed; check --endpoint and that the server is up)"
    )
    assert cached(tmp_path) == {}


def test_connection_failures_after_an_answer_are_retried(serve):
    server = serve()
    retry = teacher.RetryPolicy(retries=4, backoff=0.0)
    client = teacher.CompletionClient(url=f"{server.url}/v1/completions", model=MODEL, retry=retry)
    assert client.complete("Q: question 0\nA:") == [cqa_answer("question 0")]
    client.url = closed_port_url()
    with pytest.raises(teacher.RequestError) as failed:
        client.complete("Q: question 1\nA:")
    assert type(failed.value) is teacher.ConnectError and failed.value.retryable
    fresh = teacher.CompletionClient(url=client.url, model=MODEL, retry=retry)
    with pytest.raises(teacher.FatalRequestError, match="the first 3 connections failed"):
        fresh.complete("Q: question 1\nA:")


# What the server answers the official run with instead of the continuation, by attempt.
OFFICIAL_RUN_FAULTS = (
    Reply(status=500, body=b"overloaded"),
    Reply(status=429, headers={"Retry-After": "0"}, body=b"slow down"),
    Reply(body=b'{"choices": [{"message": {"content": "a chat reply"}}]}'),  # no "text"
    Reply(body=b'{"choices": [{"text": "cut sho'),
    Reply(drop=True),
    Reply(status=503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
)


@needs_official_data
def test_teacher_stage_rebuilds_the_prepared_cqa_test_split(tmp_path, serve):
    """The official cqa test continuations, served through faults, a kill and a partial run,
    give the very records `data prepare` builds from them."""
    prepare.prepare_official(OFFICIAL_DATA, "cqa", tmp_path / "prepared")
    prepared = tmp_path / "prepared" / "cqa" / "test.jsonl"
    expected = cache.read_records(prepared)
    outputs = official._read_teacher_outputs(OFFICIAL_DATA / "cqa" / "llm", "test")
    continuation = dict(zip([r.input for r in expected], outputs, strict=True))
    index = {r.input: i for i, r in enumerate(expected)}

    def script(question: str, attempt: int) -> Reply:
        i = index[question]
        if i % 250 == 7 and attempt == 0:
            return Reply(status=429, headers={"Retry-After": "1"}, body=b"slow down")
        if (i % 3 == 0 and attempt == 0) or (i % 12 == 0 and attempt == 1):
            return OFFICIAL_RUN_FAULTS[(i // 3 + attempt) % len(OFFICIAL_RUN_FAULTS)]
        return Reply([continuation[question]])

    server = serve(script)
    out = tmp_path / "teacher"
    argv = ["--dataset", str(prepared), "--prompt", "cqa", "--endpoint", server.url]
    argv += ["--model", official.TEACHER, "--out", str(out), "--split", "test"]
    argv += ["--concurrency", "8", "--backoff", "0.01", "--timeout", "5"]
    path = out / "test.jsonl"
    kill_after_lines([sys.executable, "-m", "dsbs_jax.teacher", *argv, "--retries", "3"], path, 300)
    killed_at = path.read_bytes().count(b"\n")
    assert teacher.main([*argv, "--retries", "0"]) == 1  # the first faults fail the examples
    partial = len(cache.read_records(path))
    assert killed_at < partial < len(expected)
    assert teacher.main([*argv, "--retries", "3"]) == 0

    written = cache.read_records(path)
    assert len(written) == len(expected) == 1221
    assert {r.id: r for r in written} == {r.id: r for r in expected}
    hedged = [r for r in written if r.parse_status == parsing.MULTIPLE_ANSWERS]
    assert len(hedged) == 25 and all(r.teacher_label and r.rationales for r in hedged)


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
