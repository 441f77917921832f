"""
Who may reach the UI and what they may call: credentials, the start-up check on exposure, client identities, and an
ASGI guard in front of Gradio's routes (named calls of UI-only handlers and oversized request bodies are refused).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from diffusers.utils import logging


logger = logging.get_logger(__name__)

AUTH_ENV = "HEADPAG_UI_AUTH"
LOOPBACK_NAMES = ("localhost",)
# Gradio's named-call routes: /gradio_api/call/NAME, /call/v2/NAME, /run/NAME, /api/NAME (with or without prefix).
NAMED_ROUTE = re.compile(r"/(?:call/v2|call|run|api)/(?P<name>[^/]+)/?$")
BODY_SLACK = 1 << 20  # multipart framing and JSON around an upload of the largest allowed size
LOGIN_ROUTES = ("/login", "/login/")
MAX_LOGIN_BODY = 64 << 10  # a login form is a user name and a password


# ---------------------------------------------------------------------------------------------------- credentials
def parse_credential(text: str, where: str) -> tuple[str, str]:
    """`"user:pass"` -> `("user", "pass")` (the password may hold `:`); messages never quote the password."""
    user, sep, password = text.strip().partition(":")
    user = user.strip()
    if not sep or not user or not password:
        raise ValueError(f"{where}: expected 'user:password' with a non-empty user and password.")
    return user, password


def read_auth_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Credentials from a file of `user:password` lines (blank lines and `#` comments skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--auth-file {path}: cannot read it ({type(e).__name__}).") from None
    out = [
        parse_credential(line, f"--auth-file {path}, line {number}")
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not out:
        raise ValueError(f"--auth-file {path} holds no 'user:password' line.")
    return out


def collect_auth(
    auth: Iterable[str] | None = None, auth_file: str | os.PathLike | None = None, env: dict | None = None
) -> list[tuple[str, str]] | None:
    r"""
    Every credential given at start-up, or `None` when there is none (authentication off).

    Args:
        auth (`list[str]`, *optional*): `--auth user:password` values.
        auth_file (`str`, *optional*): `--auth-file`, lines of `user:password`.
        env (`dict`, *optional*): The environment (default `os.environ`); `HEADPAG_UI_AUTH` holds `user:password`
            entries separated by commas or newlines.
    """
    env = os.environ if env is None else env
    pairs = [parse_credential(a, "--auth") for a in auth or ()]
    if auth_file:
        pairs += read_auth_file(auth_file)
    raw = env.get(AUTH_ENV, "")
    pairs += [parse_credential(e, AUTH_ENV) for e in re.split(r"[,\n]", raw) if e.strip()]
    users: dict[str, str] = {}
    for user, password in pairs:
        users[user] = password  # the last definition of a user wins
    return list(users.items()) or None


MIN_PASSWORD_CHARS = 12


def check_passwords(credentials: list[tuple[str, str]] | None, insecure: bool) -> str | None:
    r"""
    Refuse weak passwords at start-up: shorter than `MIN_PASSWORD_CHARS` characters, equal to (or containing) the user
    name, or one character repeated. Messages name the user, never the password.

    Args:
        credentials (`list[tuple[str, str]]`, *optional*): From [`collect_auth`].
        insecure (`bool`): `--insecure`: start anyway, with a warning (returned).

    Raises:
        `ValueError`: naming each user with a weak password and the rule it breaks, unless `insecure`.
    """
    weak = []
    for user, password in credentials or ():
        if len(password) < MIN_PASSWORD_CHARS:
            weak.append(f"{user!r} (shorter than {MIN_PASSWORD_CHARS} characters)")
        elif user.lower() in password.lower():
            weak.append(f"{user!r} (contains the user name)")
        elif len(set(password)) == 1:
            weak.append(f"{user!r} (one character repeated)")
    if not weak:
        return None
    message = f"Weak password for {', '.join(weak)}"
    if insecure:
        return f"{message}; starting anyway (--insecure)."
    raise ValueError(
        f"Refusing to start: {message}. Use at least {MIN_PASSWORD_CHARS} characters that do not contain the user "
        "name (e.g. a few random words), or pass --insecure."
    )


# ---------------------------------------------------------------------------------------------------- exposure
def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches this machine only (`127.0.0.0/8`, `::1`, `localhost`)."""
    host = (host or "").strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, share: bool, authenticated: bool, insecure: bool) -> str | None:
    r"""
    Refuse to serve beyond this machine without authentication.

    Args:
        host (`str`): The interface to bind. share (`bool`): Whether a public share link is made.
        authenticated (`bool`): Whether credentials were given. insecure (`bool`): `--insecure`.

    Returns:
        A warning to log when the exposure is allowed by `--insecure`, else `None`.

    Raises:
        `ValueError`: saying why and what to do, when the server would be reachable by others without a login.
    """
    if authenticated:
        return None
    reasons = []
    if not is_loopback(host):
        reasons.append(f"--host {host} is reachable from other machines")
    if share:
        reasons.append("--share makes a public link")
    if not reasons:
        return None
    why = " and ".join(reasons)
    if insecure:
        return f"{why}, and no authentication is set: anyone who can reach it can use this server (--insecure)."
    raise ValueError(
        f"Refusing to start: {why}, but no authentication is set, so anyone could generate images, run searches "
        "and switch the model. Give --auth user:password, --auth-file FILE or HEADPAG_UI_AUTH; or bind 127.0.0.1; "
        "or pass --insecure to serve without a login anyway."
    )


# ---------------------------------------------------------------------------------------------------- clients
def client_id(request) -> str:
    """The client of a request: the logged-in user when authentication is on, else the IP address."""
    if request is None:
        return "local"
    username = getattr(request, "username", None)
    if username:
        return f"user:{username}"
    client = getattr(request, "client", None)
    host = getattr(client, "host", None) if client is not None else None
    return f"ip:{host or 'unknown'}"


# ---------------------------------------------------------------------------------------------------- logins
class LoginThrottle:
    r"""
    Failed logins counted per user name and per client address. After `free` failures of a key within `window`
    seconds, every login attempt of that user or from that address is refused (HTTP 429, `Retry-After`) until
    `base_delay * 2 ** (failures - free)` seconds (at most `max_delay`) have passed since its last failure; a
    successful login clears the user's and the address's counts. At most `max_keys` keys are kept (the oldest are
    forgotten), so a flood of invented names cannot grow memory.

    Args:
        free (`int`, defaults to 5): Failures allowed before the delays start.
        base_delay (`float`, defaults to 1.0), max_delay (`float`, defaults to 300.0): The backoff, in seconds.
        window (`float`, defaults to 900.0): Failures older than this are forgotten.
        max_keys (`int`, defaults to 10000): Keys kept.
        clock (`Callable[[], float]`, defaults to `time.monotonic`).
    """

    def __init__(
        self,
        free: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        window: float = 900.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.free, self.base_delay, self.max_delay, self.window = free, base_delay, max_delay, window
        self.max_keys, self.clock = max_keys, clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (count, last failure)
        self._lock = threading.Lock()

    def retry_after(self, keys: Iterable[str]) -> float:
        """Seconds until a login for `keys` is accepted again (0: now)."""
        with self._lock:
            return self._retry_after(keys)

    def _retry_after(self, keys: Iterable[str]) -> float:
        now, wait = self.clock(), 0.0
        for key in keys:
            count, last = self._failures.get(key, (0, now))
            if now - last > self.window:
                self._failures.pop(key, None)
            elif count >= self.free:
                delay = min(self.max_delay, self.base_delay * 2.0 ** min(count - self.free, 30))
                wait = max(wait, last + delay - now)
        return max(0.0, wait)

    def attempt(self, keys: Iterable[str]) -> float:
        """
        A login attempt for `keys`: seconds to wait (refused) or 0, in which case it is counted as a failure at once
        (undone by [`~LoginThrottle.succeeded`]), so attempts made in parallel cannot all pass the check.
        """
        keys = list(keys)
        with self._lock:
            wait = self._retry_after(keys)
            if wait == 0:
                self._fail(keys)
            return wait

    def failed(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._fail(keys)

    def _fail(self, keys: Iterable[str]) -> None:
        now = self.clock()
        for key in keys:
            count, last = self._failures.pop(key, (0, now))
            self._failures[key] = (0 if now - last > self.window else count) + 1, now
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


class UploadQuota:
    r"""
    Upload bytes per client address within the last `window` seconds (Gradio keeps uploads that long, see
    `delete_cache` in [`~app.ui.build_app`]), refused past `max_bytes`.

    Args:
        max_bytes (`int`): Bytes one address may upload per window.
        window (`float`, defaults to 3600.0): Seconds.
        max_keys (`int`, defaults to 10000): Addresses kept (the oldest are forgotten).
        clock (`Callable[[], float]`, defaults to `time.monotonic`).
    """

    def __init__(
        self,
        max_bytes: int,
        window: float = 3600.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_bytes, self.window, self.max_keys, self.clock = max_bytes, window, max_keys, clock
        self._sent: OrderedDict[str, dict[int, int]] = OrderedDict()  # key -> {minute: bytes}
        self._lock = threading.Lock()

    def used(self, key: str) -> int:
        """Bytes `key` uploaded within the window."""
        with self._lock:
            return self._used(key)

    def _used(self, key: str) -> int:
        oldest = int((self.clock() - self.window) // 60)
        buckets = {m: n for m, n in self._sent.get(key, {}).items() if m >= oldest}
        if buckets:
            self._sent[key] = buckets
        else:
            self._sent.pop(key, None)
        return sum(buckets.values())

    def add(self, key: str, nbytes: int) -> int:
        """Count `nbytes` more for `key` (as they arrive, so parallel uploads share the quota); its total after."""
        with self._lock:
            if nbytes > 0:
                buckets = self._sent.setdefault(key, {})
                minute = int(self.clock() // 60)
                buckets[minute] = buckets.get(minute, 0) + nbytes
                self._sent.move_to_end(key)
                while len(self._sent) > self.max_keys:
                    self._sent.popitem(last=False)
            return self._used(key)


def _address(scope) -> str:
    """The client address of an ASGI scope (after uvicorn applied `--trusted-proxies`)."""
    return (scope.get("client") or ("unknown", 0))[0]


async def _form_username(scope, body: bytes) -> str | None:
    """
    The user name of a login form as the login route reads it (Starlette's form parser: urlencoded or multipart),
    stripped as Gradio strips it; `None` when the form does not hold exactly one username and one password.
    """
    from starlette.requests import Request

    sent = False

    async def once():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form(max_files=0, max_fields=8)
    except Exception:  # noqa: BLE001 - any malformed form is refused the same way
        return None
    users, passwords = form.getlist("username"), form.getlist("password")
    if len(users) != 1 or len(passwords) != 1 or not isinstance(users[0], str):
        return None
    return users[0].strip()


# ---------------------------------------------------------------------------------------------------- ASGI guard
class BodyTooLarge(Exception):
    """A request body went past the limit while it streamed in."""


class RequestGuard:
    r"""
    ASGI middleware in front of the Gradio app (every route passes it, logged in or not).

    Args:
        app: The wrapped ASGI app.
        public (`Callable[[], Sequence[str]]`): The API names clients may call by name; a named call
            (`/gradio_api/call/NAME`, `/run/NAME`, ...) of any other handler is answered 404.
        max_body (`int`): Largest request body in bytes. A larger declared `Content-Length` gets 413 before anything
            is read; every body (chunked or not) is also counted as it streams in, and the request is answered 413
            as soon as the count passes the limit, without reading (or buffering) the rest.
        throttle ([`LoginThrottle`], *optional*): Failed logins per user and per address (`POST /login`), answered
            429 while their backoff lasts.
        uploads ([`UploadQuota`], *optional*): Upload bytes per address (`POST .../upload`), answered 429 past it.
    """

    def __init__(
        self,
        app,
        public: Callable[[], Sequence[str]],
        max_body: int,
        throttle: LoginThrottle | None = None,
        uploads: UploadQuota | None = None,
    ):
        self.app, self.public, self.max_body, self.throttle, self.uploads = app, public, max_body, throttle, uploads

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await self._answer(send, *refusal)
            return
        if self.throttle is not None and scope.get("method") == "POST" and scope.get("path") in LOGIN_ROUTES:
            await self._login(scope, receive, send)
            return
        received = 0
        started = answered = False
        upload_key = None
        if self.uploads is not None and scope.get("method") == "POST" and scope.get("path", "").endswith("/upload"):
            upload_key = f"ip:{_address(scope)}"
            if self.uploads.used(upload_key) >= self.uploads.max_bytes:
                await self._answer(send, 429, self._upload_message())
                return

        async def counted_receive():
            nonlocal received, started, answered
            message = await receive()
            if message.get("type") == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                over_quota = upload_key is not None and self.uploads.add(upload_key, chunk) > self.uploads.max_bytes
                if received > self.max_body or over_quota:
                    # Answer now: the app may turn the error below into a response of its own (FastAPI: a 400).
                    if not started:
                        if over_quota:
                            await self._answer(send, 429, self._upload_message())
                        else:
                            await self._answer(send, 413, f"Request body is over the limit of {self.max_body} bytes.")
                        started = answered = True
                    raise BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if answered:
                return  # the 413 went out already; whatever the app answers after the refusal is dropped
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            pass

    def _upload_message(self) -> str:
        return (
            f"Upload quota: this address sent {self.uploads.max_bytes >> 20} MB within the last "
            f"{self.uploads.window / 3600:g} h (max_uploads_mb_per_client); try again later."
        )

    async def _login(self, scope, receive, send) -> None:
        """A login attempt: read its small form, refuse it while the user or the address waits, count the result."""
        body, more = b"", True
        while more:
            message = await receive()
            if message.get("type") != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_LOGIN_BODY:
                await self._answer(send, 413, f"A login form is at most {MAX_LOGIN_BODY} bytes.")
                return
        user = await _form_username(scope, body)
        if user is None:
            await self._answer(send, 400, "A login form has exactly one username and one password.")
            return
        keys = [f"user:{user}", f"ip:{_address(scope)}"]
        wait = self.throttle.attempt(keys)
        if wait > 0:
            seconds = math.ceil(wait)
            await self._answer(
                send, 429, f"Too many failed logins; try again in {seconds} s.", [(b"retry-after", b"%d" % seconds)]
            )
            return
        status = 0
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def watch(message):
            nonlocal status
            if message.get("type") == "http.response.start":
                status = message.get("status", 0)
            await send(message)

        await self.app(scope, replay, watch)
        if status == 200:  # the attempt was counted as a failure up front (parallel attempts count at once)
            self.throttle.succeeded(keys)

    @staticmethod
    async def _answer(send, status: int, message: str, headers: list | None = None) -> None:
        body = json.dumps({"detail": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *(headers or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, scope) -> tuple[int, str] | None:
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return 400, "Invalid Content-Length."
                if size > self.max_body:
                    return 413, f"Request body of {size} bytes is over the limit of {self.max_body} bytes."
        if scope.get("method") == "POST":
            match = NAMED_ROUTE.search(scope.get("path", ""))
            if match and match["name"] not in self.public():
                return 404, "No such API endpoint."
        return None
