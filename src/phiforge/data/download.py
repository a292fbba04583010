"""Polite, resumable HTTP downloads into a local cache (stdlib urllib only).

`Fetcher.fetch(url, dest)`:
- a complete `dest` is a cache hit: no request is made;
- otherwise the bytes go to `dest.part`; an existing `.part` is continued with `Range: bytes=N-` (a 206 reply
  is appended, a 200 reply restarts the file, a 416 means the part is already whole), and the file is renamed
  to `dest` only once the whole body (Content-Length / Content-Range) has arrived;
- connection errors, timeouts, a body cut short, 429 and 5xx are retried up to `retries` times with
  exponential backoff (`backoff * 2^k`, capped at `max_backoff`, or the server's Retry-After if larger);
- 404/410 mean "not on this mirror": `FetchResult.status == "missing"`, no retry;
- requests start at least `1 / rate` seconds apart (the rate limit), counting retries.

Gutenberg asks robots to keep to about one request every two seconds; the default rate is 0.5/s.
"""

from __future__ import annotations

import email.utils
import http.client
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from phiforge import __version__
from phiforge.errors import DataError

USER_AGENT = f"phiforge/{__version__} (+data prepare; polite, cached)"


@dataclass
class FetchResult:
    url: str
    path: Path
    status: str  # "cached", "downloaded", "resumed", "missing"
    bytes: int = 0  # bytes received in this call
    attempts: int = 0


class Fetcher:
    def __init__(self, retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, rate: float = 0.5,
                 timeout: float = 60.0, user_agent: str = USER_AGENT, sleep=time.sleep, clock=time.monotonic):
        if rate <= 0:
            raise DataError(f"--rate-limit must be positive (requests per second), got {rate}")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.interval, self.timeout, self.user_agent = 1.0 / rate, timeout, user_agent
        self._sleep, self._clock = sleep, clock
        self._last = None
        self.requests = 0

    def _wait_turn(self) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            self._sleep(self.interval - (now - self._last))
        self._last = self._clock()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        d = min(self.max_backoff, self.backoff * 2**attempt)
        if retry_after:
            try:
                d = max(d, min(self.max_backoff, float(retry_after)))
            except ValueError:
                when = email.utils.parsedate_to_datetime(retry_after)
                if when is not None:
                    d = max(d, min(self.max_backoff, when.timestamp() - time.time()))
        return max(0.0, d)

    def fetch(self, url: str, dest: str | Path) -> FetchResult:
        dest = Path(dest)
        if dest.is_file():
            return FetchResult(url, dest, "cached")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        got = 0
        resumed = part.is_file() and part.stat().st_size > 0
        last_error = ""
        for attempt in range(self.retries + 1):
            have = part.stat().st_size if part.is_file() else 0
            req = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
            if have:
                req.add_header("Range", f"bytes={have}-")
            self._wait_turn()
            self.requests += 1
            retry_after = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    code = resp.status
                    if code == 206:
                        total = _range_total(resp.headers.get("Content-Range"))
                        mode = "ab"
                    else:  # 200: the whole file (the server ignored or did not get a Range)
                        total = _int_or_none(resp.headers.get("Content-Length"))
                        mode, have = "wb", 0
                    with open(part, mode) as f:
                        while True:
                            block = resp.read(1 << 16)
                            if not block:
                                break
                            f.write(block)
                            got += len(block)
                    size = part.stat().st_size
                    if total is not None and size < total:
                        last_error = f"body cut short ({size} of {total} bytes)"
                        self._sleep(self._delay(attempt, None))
                        continue
                    os.replace(part, dest)
                    return FetchResult(url, dest, "resumed" if resumed else "downloaded", got, attempt + 1)
            except urllib.error.HTTPError as e:
                if e.code in (404, 410):
                    return FetchResult(url, dest, "missing", got, attempt + 1)
                if e.code == 416 and have:  # the part we have is already the whole file
                    total = _range_total(e.headers.get("Content-Range"))
                    if total is None or total == have:
                        os.replace(part, dest)
                        return FetchResult(url, dest, "resumed", got, attempt + 1)
                    part.unlink()
                    last_error = "HTTP 416"
                    continue
                if e.code != 429 and e.code < 500:
                    raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
                last_error, retry_after = f"HTTP {e.code}", e.headers.get("Retry-After")
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as e:
                last_error = str(getattr(e, "reason", e)) or type(e).__name__
            if attempt < self.retries:
                self._sleep(self._delay(attempt, retry_after))
        raise DataError(f"download of {url} failed after {self.retries + 1} attempts ({last_error}); "
                        f"re-run to continue from {part if part.exists() else dest}")


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _range_total(content_range: str | None):
    """The total size from 'bytes 100-199/200'."""
    if not content_range or "/" not in content_range:
        return None
    return _int_or_none(content_range.rsplit("/", 1)[1])
