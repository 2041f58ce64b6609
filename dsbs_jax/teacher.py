"""Teacher stage: prompt an LLM with few-shot chain-of-thought and build the teacher cache.

The official archive ships PaLM's outputs for four datasets only. To distil from
another teacher, or on other data, this command asks any OpenAI-compatible
server (`/v1/completions`, or `/v1/chat/completions` with --chat) to answer each
input after a few worked exemplars, parses the answers with the same parsers as
the official outputs, and appends canonical `TeacherRecord`s to
`<out>/<split>.jsonl`.

Labelling thousands of inputs through a remote, rate-limited API fails in
pieces, so a run is built to be restarted rather than to never fail: requests
are retried with backoff, every finished example is appended, flushed and
fsync'd at once by one writer, a rerun skips the ids already cached and drops a
torn final line left by a kill, and examples that still fail are not written,
so the next run asks for them again.

A prompt file is plain text in which `{input}` stands for the example's input;
for NLI inputs ("premise</s>hypothesis") `{premise}` and `{hypothesis}` may be
used instead. Trailing newlines are dropped, so the prompt ends where the answer
starts. `--prompt cqa` (or svamp, esnli, anli1) names a prompt shipped in
`dsbs_jax/prompts/`.

A reply without usable text (not JSON, or JSON of another shape) is retried like
a 5xx. A connection that cannot be made (refused, unknown host, no route) is
retried too once the server has answered, but stops the run while it never has.

A run that leaves every example cached also writes the dataset's SentencePiece
vocabulary `<out>/spm.model`, trained on the folder's train split, unless the
folder has one (it is kept: models trained with it depend on its ids) or
--no-vocab is given (runs then need VOCABULARY_PATH).

Exit status: 0 when every example is cached, 1 when some failed (rerun to retry
them), 2 for bad input, a request the server refuses outright (401, 403, 404)
or a server the first 3 connections could not reach, 130 when interrupted. The
API key is read from the variable --api-key-env names, stripped of surrounding
whitespace; one an HTTP header cannot carry is refused before any request, and
no message shows any of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import http.client
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from email.utils import parsedate_to_datetime
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from dsbs_jax.data import parsing, vocab
from dsbs_jax.data.cache import (
    SPLITS,
    Example,
    TeacherRecord,
    iter_records,
    read_examples,
    split_path,
)
from dsbs_jax.data.official import DATASETS, NLI_SEPARATOR
from dsbs_jax.data.records import make_record
from dsbs_jax.errors import UserError

SHIPPED_PROMPTS = ("cqa", "svamp", "esnli", "anli1")
PLACEHOLDER = re.compile(r"\{(input|premise|hypothesis)\}")
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, endpoint or model: no example can succeed
KEY_REFUSED_STATUS = frozenset({401, 403})
# Connection failures before the server has answered once that mean it is not there at all.
UNREACHABLE_AFTER = 3
NO_CONNECTION_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
# Runs of this many of the key's characters are hidden in messages (servers echo a key's tail).
REDACT_MIN_CHARS = 4


class TeacherError(UserError):
    """Bad input to the teacher stage (prompt, parser, options, busy cache); says which."""


class RequestError(Exception):
    """One request that did not give usable completions; `retryable` says whether to try again,
    `status` is the HTTP status of the answer, if there was one."""

    def __init__(
        self,
        message: str,
        retryable: bool = True,
        retry_after: float | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class ConnectError(RequestError):
    """No connection was made (refused, unknown host, no route); `RequestError` otherwise."""


class FatalRequestError(RequestError):
    """A failure every other request would meet too (401, 403, 404, a server never reached):
    the run stops."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message, retryable=False, status=status)


# --- inputs and prompts ---------------------------------------------------------------------


def read_prompt(spec: str) -> str:
    """The template in file `spec`, or the shipped prompt named `spec`; it needs a placeholder."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif spec in SHIPPED_PROMPTS:
        prompts = resources.files("dsbs_jax").joinpath("prompts")
        text = prompts.joinpath(f"{spec}.txt").read_text(encoding="utf-8")
    else:
        raise TeacherError(f"no prompt file {spec} (shipped: {', '.join(SHIPPED_PROMPTS)})")
    if not PLACEHOLDER.search(text):
        raise TeacherError(f"prompt {spec} has no {{input}} (or {{premise}}/{{hypothesis}})")
    return text.rstrip("\r\n")


def build_prompt(template: str, text: str) -> str:
    """Fills the placeholders in one pass, so braces inside the input are left alone."""
    fields = {"input": text}
    if NLI_SEPARATOR in text:
        fields["premise"], fields["hypothesis"] = text.split(NLI_SEPARATOR, 1)

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in fields:
            raise TeacherError(
                f"{{{match.group(1)}}} needs an input 'premise{NLI_SEPARATOR}hyp...'"
            )
        return fields[match.group(1)]

    return PLACEHOLDER.sub(fill, template)


def resolve_parser(name: str | None, prompt: str) -> parsing.Parser:
    """The parser named by --parser, else the one of the dataset the prompt file is named after."""
    name = name or Path(prompt).stem
    if name not in DATASETS:
        raise TeacherError(f"cannot tell the parser from prompt {prompt}; pass --parser")
    return DATASETS[name].parser


# --- HTTP: one request, rate limit, retries -------------------------------------------------


def completions_url(endpoint: str, chat: bool) -> str:
    """Accepts a server root, a `.../v1` base URL or the full completions URL."""
    endpoint = endpoint.rstrip("/")
    if endpoint.endswith("/completions"):
        return endpoint
    base = endpoint if endpoint.endswith("/v1") else f"{endpoint}/v1"
    return f"{base}/chat/completions" if chat else f"{base}/completions"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _redact(text: str, secret: str | None) -> str:
    """`text` with every run of REDACT_MIN_CHARS or more characters of `secret` as ***."""
    if not secret:
        return text
    kept, start = [], 0
    while start < len(text):
        end = start
        while end < len(text) and text[start : end + 1] in secret:
            end += 1
        if end - start >= REDACT_MIN_CHARS:
            kept.append("***")
            start = end
        else:
            kept.append(text[start])
            start += 1
    return "".join(kept)


def _http_error(error: urllib.error.HTTPError, url: str, api_key: str | None) -> RequestError:
    try:
        body = " ".join(error.read(300).decode("utf-8", "replace").split())
    except (OSError, http.client.HTTPException):
        body = ""
    finally:
        error.close()
    message = _redact(f"HTTP {error.code} from {url}: {body}".rstrip(": "), api_key)
    if error.code in FATAL_STATUS:
        return FatalRequestError(message, error.code)
    retryable = error.code in RETRYABLE_STATUS or error.code >= 500
    retry_after = parse_retry_after(error.headers.get("Retry-After"))
    return RequestError(message, retryable, retry_after, error.code)


def post_json(url: str, body: dict, api_key: str | None, timeout: float) -> object:
    """One POST of `body`; every way it can fail becomes a RequestError (key redacted)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        raise _http_error(e, url, api_key) from None
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        if _never_connected(reason):
            raise ConnectError(f"cannot connect to {url}: {reason}") from None
        raise RequestError(f"no answer from {url}: {reason}") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # also bytes that are not UTF-8, or nested too deep
        raise RequestError(f"response from {url} is not valid JSON") from None


def _never_connected(reason: object) -> bool:
    """Whether the socket never connected: refused, unknown host or no route (urllib wraps
    connect's OSError in a URLError whose reason it is), not a fault of a connected one."""
    if isinstance(reason, socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in NO_CONNECTION_ERRNOS


def _choice_text(choice: object, chat: bool) -> object:
    """A choice's `text`, or its `message.content` for chat; None where the shape is wrong."""
    if not isinstance(choice, dict):
        return None
    if not chat:
        return choice.get("text")
    message = choice.get("message")
    return message.get("content") if isinstance(message, dict) else None


def extract_texts(response: object, chat: bool) -> list[str]:
    """The completions in an OpenAI-format response; a malformed one raises (retryable)."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices:
        raise RequestError("response has no 'choices'")
    texts = [_choice_text(choice, chat) for choice in choices]
    if not all(isinstance(text, str) for text in texts):
        field = "message.content" if chat else "text"
        raise RequestError(f"response has a choice without a string '{field}'")
    return texts


class RateLimiter:
    """Token bucket shared by all workers: at most `rate` requests a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: float = 1.0):
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, sleep: Callable[[float], object] = time.sleep) -> None:
        """Takes a token, waiting for it outside the lock (a debt others queue behind)."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - 1
            self._last = now
            wait = -self._tokens / self.rate
        if wait > 0:
            sleep(wait)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first, with exponential backoff and jitter."""

    retries: int = 5
    backoff: float = 1.0
    max_delay: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry number `attempt + 1`: half fixed, half random, never before
        the server's Retry-After."""
        step = min(self.max_delay, self.backoff * 2**attempt)
        jittered = step / 2 + random.uniform(0, step / 2)
        return min(self.max_delay, max(jittered, retry_after or 0.0))


@dataclasses.dataclass
class CompletionClient:
    """Asks an OpenAI-compatible server for `samples` completions of a prompt, retrying.

    Until the server has answered once, a connection that cannot be made counts towards
    UNREACHABLE_AFTER, which stops the run; after that it is a transient fault like others.
    """

    url: str
    model: str
    chat: bool = False
    samples: int = 1
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    api_key: str | None = dataclasses.field(default=None, repr=False)
    key_variable: str = "OPENAI_API_KEY"  # named when the server wants a key and none was set
    timeout: float = 60.0
    retry: RetryPolicy = RetryPolicy()
    limiter: RateLimiter | None = None
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event, init=False)
    _answered: threading.Event = dataclasses.field(default_factory=threading.Event, init=False)
    _connect_failures: int = dataclasses.field(default=0, init=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False)

    def request_body(self, prompt: str) -> dict:
        body: dict = {"model": self.model, "n": self.samples}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body.update(temperature=self.temperature, max_tokens=self.max_tokens)
        if self.stop:
            body["stop"] = list(self.stop)
        return body

    def attempt(self, prompt: str) -> list[str]:
        """One rate-limited request."""
        if self.limiter:
            self.limiter.acquire(self._cancelled.wait)
        if self._cancelled.is_set():
            raise RequestError("cancelled", retryable=False)
        try:
            response = post_json(self.url, self.request_body(prompt), self.api_key, self.timeout)
        except ConnectError as e:
            self._connect_failed(e)
            raise
        except RequestError as e:
            self._answered.set()
            if self.api_key is None and e.status in KEY_REFUSED_STATUS:
                hint = f"{self.key_variable} is unset or empty, so no key was sent"
                raise FatalRequestError(f"{e} ({hint})", e.status) from None
            raise
        self._answered.set()
        return extract_texts(response, self.chat)

    def _connect_failed(self, error: ConnectError) -> None:
        """Counts a failed connection; raises FatalRequestError when the server never answered
        and UNREACHABLE_AFTER connections have failed."""
        with self._lock:
            self._connect_failures += 1
            unreachable = self._connect_failures >= UNREACHABLE_AFTER
        if unreachable and not self._answered.is_set():
            raise FatalRequestError(
                f"{error} (the first {UNREACHABLE_AFTER} connections failed; "
                "check --endpoint and that the server is up)"
            ) from None

    def complete(self, prompt: str) -> list[str]:
        """The completions, after up to `retry.retries` retries; raises the last RequestError."""
        attempt = 0
        while True:
            try:
                return self.attempt(prompt)
            except RequestError as e:
                if not e.retryable or attempt >= self.retry.retries:
                    raise
                if self._cancelled.wait(self.retry.delay(attempt, e.retry_after)):
                    raise
            attempt += 1

    def cancel(self) -> None:
        """Makes waiting and later requests give up at once (on interrupt or a fatal error)."""
        self._cancelled.set()


# --- the cache file -------------------------------------------------------------------------


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Drops a final line cut short by a kill mid-write; returns the number of bytes dropped.

    A last line that is complete JSON and only lacks its newline (a hand-edited
    file) gets the newline instead.
    """
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        tail = b""
        while end > 0 and b"\n" not in tail:
            start = max(0, end - 65536)
            f.seek(start)
            tail = f.read(end - start) + tail
            end = start
        tail = tail.rsplit(b"\n", 1)[-1]
        if not tail:
            return 0
        try:
            json.loads(tail)
        except ValueError:  # also a UTF-8 character cut in half
            f.truncate(f.seek(0, os.SEEK_END) - len(tail))
            f.flush()
            os.fsync(f.fileno())
            return len(tail)
        f.seek(0, os.SEEK_END)
        f.write(b"\n")
        return 0


def _lock(file: BinaryIO, path: Path) -> None:
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TeacherError(f"{path} is being written by another teacher run") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CacheAppender:
    """The one writer of a cache file: locks it, repairs a torn tail, appends durably.

    `done_ids` holds the ids already cached; `dropped_bytes` what the repair cut.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._file = self.path.open("ab")
        try:
            _lock(self._file, self.path)
            if created:
                _fsync_dir(self.path.parent)
            self.dropped_bytes = repair_torn_tail(self.path)
            self.done_ids = {record.id for record in iter_records(self.path)}
        except BaseException:
            self._file.close()
            raise

    def append(self, record: TeacherRecord) -> None:
        """Writes one line and makes it durable before returning."""
        self._file.write((record.to_json() + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done_ids.add(record.id)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CacheAppender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the run loop ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunStats:
    """What a run did: examples written parsed or unparseable, and failed (not written)."""

    parsed: int = 0
    unparseable: int = 0
    failed: int = 0
    first_error: str | None = None


def run(
    jobs: Sequence[tuple[Example, str]],
    client: CompletionClient,
    parser: parsing.Parser,
    appender: CacheAppender,
    concurrency: int = 4,
) -> RunStats:
    """Prompts the teacher for each (example, prompt) on `concurrency` threads; this thread
    alone writes each finished example. A FatalRequestError or an interrupt cancels the rest."""
    stats = RunStats()
    bar = tqdm(
        total=len(jobs),
        desc="teacher",
        unit="ex",
    )
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher")
    try:
        futures = {pool.submit(client.complete, prompt): example for example, prompt in jobs}
        for future in as_completed(futures):
            try:
                texts = future.result()
            except FatalRequestError:
                raise
            except RequestError as e:
                stats.failed += 1
                stats.first_error = stats.first_error or str(e)
            else:
                record = make_record(futures[future], texts, parser, client.model)
                appender.append(record)
                if record.parse_ok:
                    stats.parsed += 1
                else:
                    stats.unparseable += 1
            bar.update()
            bar.set_postfix(parsed=stats.parsed, unparseable=stats.unparseable, failed=stats.failed)
    finally:
        client.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return stats


# --- command line ---------------------------------------------------------------------------


def parse_rate(text: str) -> float:
    """'10', '10/s' or '600/m' -> requests per second."""
    number, _, unit = text.partition("/")
    try:
        rate = float(number) / {"": 1.0, "s": 1.0, "m": 60.0}[unit]
    except (ValueError, KeyError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"expected a rate such as 10/s or 600/m, got {text!r}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsbs_jax.teacher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help="JSON lines with id, input, label (optional)")
    p.add_argument("--prompt", required=True, help="prompt file, or cqa/svamp/esnli/anli1")
    p.add_argument("--endpoint", required=True, help="server URL, e.g. http://localhost:8000")
    p.add_argument("--model", required=True, help="model name; recorded as the teacher")
    p.add_argument("--out", required=True, help="cache folder; appends to <out>/<split>.jsonl")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--parser", choices=sorted(DATASETS), help="default: the prompt's file name")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--samples", type=int, default=1, help="completions per example (n)")
    p.add_argument("--temperature", type=float, help="default 0 for one sample, else 0.7")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--rate-limit", type=parse_rate, help="most requests, e.g. 10/s or 600/m")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed request")
    p.add_argument(
        "--backoff", type=float, default=1.0, help="seconds before the first retry, doubling"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the key")
    p.add_argument(
        "--no-vocab", action="store_true", help="write no <out>/spm.model vocabulary at the end"
    )
    return p


def read_api_key(variable: str) -> str | None:
    """The key in environment variable `variable`, None when unset or blank.

    Checked before any request, so that a key an HTTP header cannot carry fails here with a
    message naming the variable; no message shows any of the key.
    """
    value = os.environ.get(variable, "")
    key = value.strip()
    if key != value:
        print(f"warning: ignoring whitespace around the key in {variable}", file=sys.stderr)
    if not (key.isprintable() and all(ord(c) < 256 for c in key)):  # Latin-1, no controls
        raise TeacherError(
            f"{variable} holds a character an HTTP header cannot carry (a non-Latin-1 or a "
            "control character); set it to the key alone"
        )
    return key or None


def _check_args(args: argparse.Namespace) -> None:
    for name in ("samples", "max_tokens", "concurrency"):
        if getattr(args, name) < 1:
            raise TeacherError(f"--{name.replace('_', '-')} must be at least 1")
    if args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        raise TeacherError("--retries and --backoff must be >= 0 and --timeout > 0")


def _teach(args: argparse.Namespace) -> int:
    _check_args(args)
    api_key = read_api_key(args.api_key_env)
    template = read_prompt(args.prompt)
    parser = resolve_parser(args.parser, args.prompt)
    examples = read_examples(args.dataset)
    prompts = {}
    for example in examples:
        try:
            prompts[example.id] = build_prompt(template, example.input)
        except TeacherError as e:
            raise TeacherError(f"{args.dataset}: example {example.id!r}: {e}") from None
    default_temperature = 0.0 if args.samples == 1 else 0.7  # identical samples are no use
    client = CompletionClient(
        url=completions_url(args.endpoint, args.chat),
        model=args.model,
        chat=args.chat,
        samples=args.samples,
        temperature=default_temperature if args.temperature is None else args.temperature,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        api_key=api_key,
        key_variable=args.api_key_env,
        timeout=args.timeout,
        retry=RetryPolicy(retries=args.retries, backoff=args.backoff),
        limiter=RateLimiter(args.rate_limit) if args.rate_limit else None,
    )
    path = split_path(args.out, args.split)
    with CacheAppender(path) as appender:
        if appender.dropped_bytes:
            print(
                f"dropped a torn final line ({appender.dropped_bytes} bytes) from {path}",
                file=sys.stderr,
            )
        jobs = [(e, prompts[e.id]) for e in examples if e.id not in appender.done_ids]
        stats = run(jobs, client, parser, appender, concurrency=args.concurrency)
    print(
        f"{args.split}: {stats.parsed + stats.unparseable} written ({stats.parsed} parsed, "
        f"{stats.unparseable} unparseable), {stats.failed} failed, "
        f"{len(examples) - len(jobs)} already cached -> {path}"
    )
    if stats.failed:
        print(
            f"error: {stats.failed} example(s) failed (after up to {args.retries} retries) and "
            f"were not written; rerun to retry them (first error: {stats.first_error})",
            file=sys.stderr,
        )
        return 1
    if not args.no_vocab:
        print(vocab.write_dataset_vocab(args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _teach(args)
    except KeyboardInterrupt:
        print("interrupted: finished examples are cached; rerun to continue", file=sys.stderr)
        return 130
    except (ValueError, OSError, FatalRequestError) as e:  # TeacherError, CacheFormatError too
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
