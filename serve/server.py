"""One server: the Gradio UI at / and the OpenAI-compatible API at /v1, on one engine.

`python -m serve web` (what `make serve` runs). Loopback by default.

Who may use it:

- `--api-key KEY` (or $LORASWAP_API_KEY, which `ps` does not show) puts the API behind
  `Authorization: Bearer KEY`, and /metrics too unless `--open-metrics`; /health stays open
  (serve/metrics.py, docs/fleet.md).
- `--auth user:password` (one login per flag; repeat it for several), `--auth-file FILE` or
  $LORASWAP_AUTH (one `user:password` per line) put a login in front of the UI. A login splits at
  its first colon and the password is the rest, verbatim: commas, colons and spaces are part of
  it, so no password can ever turn into a second login. In a file, blank lines and lines starting
  with '#' are skipped. A value that yields no login is an error at start-up, naming its source.
- With an API key and no logins, the UI's login takes the API key as its password (any user
  name): Gradio's own routes (the page's /config, /gradio_api/... including the /chat and
  /compare endpoints that gradio_client calls) are then never open while the API is closed. A
  script logs in the way a browser does: `gradio_client.Client(url, auth=("me", KEY))`. Gradio
  decides access to its routes from its session cookie alone, so a bearer header there is not
  accepted: honouring one would mean writing into Gradio's private session table.
- Failed logins are throttled by client address (`ThrottleConfig`): a wrong password on the UI's
  /login and a wrong key on /v1 or /metrics all count; past the limit that address gets 429 on
  them for a while. Behind a proxy every client shares the proxy's address: put the throttle there instead.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from adapters.cli import AT_LEAST_ONE, POSITIVE, Range, opt

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3
"""On SIGTERM, how long requests in flight may run on before they are cancelled."""


@dataclass(frozen=True)
class ThrottleConfig:
    max_failures: int = opt(5, "Failed logins (a UI password, an API key) from one address within --window-s "
                               "after which it is refused for --lockout-s.", range=AT_LEAST_ONE)
    window_s: float = opt(60.0, "Seconds over which one address's failed logins are counted.", range=POSITIVE)
    lockout_s: float = opt(60.0, "Seconds a refused address's logins and API calls get 429.", range=POSITIVE)

    def __post_init__(self) -> None:
        if self.max_failures < 1 or self.window_s <= 0 or self.lockout_s <= 0:
            raise ValueError(f"invalid throttle: {self}")


DEFAULT_HOST = "127.0.0.1"
"""Loopback: nothing beyond this machine reaches the server unless told to."""
DEFAULT_PORT = 7860


@dataclass(frozen=True)
class AccessSettings:
    """Who may use the server, as the operator gives it (flags, a YAML file): `access_from`
    resolves it, with $LORASWAP_AUTH and $LORASWAP_API_KEY, into an `AccessConfig`."""

    host: str = opt(DEFAULT_HOST, "Address to bind (loopback by default).")
    port: int = opt(DEFAULT_PORT, "Port to listen on.", range=Range(1, 65535, high_open=False))
    auth: tuple[str, ...] = opt((), "A UI login, split at the first colon (a comma is part of the password); repeat "
                                    "the flag for several.", action="append", metavar="USER:PASSWORD")
    auth_file: str | None = opt(None, "File of UI logins, one user:password per line ($LORASWAP_AUTH: the same, "
                                      "one per line).")
    api_key: str | None = opt(None, "Bearer token the API requires; without --auth it is also the UI's login "
                                    "password. Prefer $LORASWAP_API_KEY, which `ps` does not show.")
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)


@dataclass(frozen=True)
class AccessConfig:
    """Who may use the server, resolved: the logins parsed, the key read from the environment."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    auth: tuple[tuple[str, str], ...] = ()
    """UI logins (user, password); empty: no login, unless there is an API key (see the module docstring)."""
    api_key: str | None = None
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)


def parse_login(text: str, source: str) -> tuple[str, str]:
    """One 'user:password', split at the first colon: the password is the rest, verbatim.

    The error names `source` and what is missing, never the text (it may hold a password).
    """
    user, colon, password = text.partition(":")
    user = user.strip()  # Gradio strips the user name it is sent
    for missing, why in ((not colon, "no colon"), (not user, "empty user name"), (not password, "empty password")):
        if missing:
            raise ValueError(f"{source}: not user:password ({why})")
    return user, password


def parse_logins(text: str, source: str) -> tuple[tuple[str, str], ...]:
    """One 'user:password' per line (a file, $LORASWAP_AUTH); blank and '#' lines are skipped.
    At least one login, or ValueError naming `source`."""
    logins = []
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = line.removesuffix("\r")  # only the line ending: the rest of the line is the password
        if line.strip() and not line.lstrip().startswith("#"):
            logins.append(parse_login(line, f"{source} line {n}"))
    if not logins:
        raise ValueError(f"{source}: no user:password line in it")
    return tuple(logins)


def _read_logins(path: str) -> tuple[tuple[str, str], ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--auth-file {path}: cannot read it: {err}") from err
    return parse_logins(text, f"--auth-file {path}")


def _unique(logins: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    users = [user for user, _ in logins]
    twice = sorted({user for user in users if users.count(user) > 1})
    if twice:
        raise ValueError(f"--auth: user {twice[0]!r} has more than one login; give each user one")
    return logins


def access_from(args: AccessSettings) -> AccessConfig:
    """The access settings from `python -m serve web`'s flags and the environment.

    Raises ValueError naming the flag, file or variable at fault (`--auth ' , '`, an empty file,
    an empty --api-key).
    """
    logins = tuple(parse_login(item, "--auth") for item in args.auth or ())
    if args.auth_file:
        logins += _read_logins(args.auth_file)
    if not logins and os.environ.get("LORASWAP_AUTH"):
        logins = parse_logins(os.environ["LORASWAP_AUTH"], "$LORASWAP_AUTH")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key: empty (an unset variable?); leave the flag out for an open API")
    api_key = args.api_key or os.environ.get("LORASWAP_API_KEY") or None
    return AccessConfig(args.host, args.port, _unique(logins), api_key, args.throttle)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(access: AccessConfig) -> str | None:
    """What to tell someone binding beyond loopback without protection."""
    if is_loopback(access.host) or access.api_key:  # with a key and no logins, the UI takes the key
        return None
    missing = ("--auth (UI login) or --api-key (API token)" if not access.auth else "--api-key (API token)")
    return (f"WARNING: serving on {access.host}, reachable from other machines, without {missing}: "
            "anyone who can reach this port can use it. Keep 127.0.0.1, or set --api-key (and --auth for named UI "
            "logins), ideally behind a TLS proxy.")


class FailureThrottle:
    """Failed credentials per client address, and which addresses are locked out. Pure
    bookkeeping; used from the server's event loop only, so it takes no lock."""

    def __init__(self, config: ThrottleConfig = ThrottleConfig(), clock=time.monotonic):
        self.config, self.clock = config, clock
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        return max(0.0, self._locked_until.get(client, 0.0) - self.clock())

    def failed(self, client: str) -> None:
        now = self.clock()
        recent = self._failures.setdefault(client, deque())
        recent.append(now)
        while recent and recent[0] <= now - self.config.window_s:
            recent.popleft()
        if len(recent) >= self.config.max_failures:
            self._locked_until[client] = now + self.config.lockout_s
            del self._failures[client]
            log.warning("%d failed logins from %s within %.0f s: refusing it for %.0f s", len(recent), client,
                        self.config.window_s, self.config.lockout_s)
        if len(self._failures) + len(self._locked_until) > 1024:  # many addresses: forget the stale ones
            self._forget_stale(now)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _forget_stale(self, now: float) -> None:
        self._failures = {c: d for c, d in self._failures.items() if d and d[-1] > now - self.config.window_s}
        self._locked_until = {c: t for c, t in self._locked_until.items() if t > now}


class ThrottleMiddleware:
    """ASGI middleware over the whole app: counts failed credentials by client address (POST
    /login answered 400 or 401; a /v1 request that sent an Authorization header answered 401)
    and answers 429 to a locked-out address on both. A request without any key is refused by the
    API as before but not counted: it guesses nothing."""

    def __init__(self, app, throttle: FailureThrottle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope, receive, send) -> None:
        route = _credential_route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else "unknown"
        wait = self.throttle.retry_after(client)
        if wait > 0:
            await _too_many_failures(wait)(scope, receive, send)
            return

        async def judged(message) -> None:
            if message["type"] == "http.response.start":
                self._judge(route, scope, message["status"], client)
            await send(message)

        await self.app(scope, receive, judged)

    def _judge(self, route: str, scope, status: int, client: str) -> None:
        if route == "login" and status in (400, 401):
            self.throttle.failed(client)
        elif route == "login" and status == 200:
            self.throttle.succeeded(client)
        elif route == "api" and status == 401 and any(name == b"authorization" for name, _ in scope["headers"]):
            self.throttle.failed(client)


def _credential_route(scope) -> str | None:
    """'login' for Gradio's login form, 'api' for the API, None for everything else."""
    if scope["type"] != "http":
        return None
    path = scope["path"]
    if scope["method"] == "POST" and path.rstrip("/") == "/login":
        return "login"
    if path == "/v1" or path.startswith("/v1/") or path == "/metrics":  # /metrics takes the API key too
        return "api"
    return None


def _too_many_failures(wait: float):
    from starlette.responses import JSONResponse

    seconds = math.ceil(wait)
    error = {"message": f"too many failed logins from this address; retry in {seconds} s", "type": "requests",
             "param": None, "code": "rate_limit_exceeded"}
    return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": str(seconds)})


def make_app(service, access: AccessConfig, limits=None, fleet=None, ui=None, runs=None):
    """The FastAPI app: API routes first, the Gradio UI mounted at /, the login throttle over both.
    limits: `serve.api.ApiLimits` (its defaults when None); fleet: `serve.management.FleetSettings`
    (runtime loading off, /metrics behind the key, when None); ui: `serve.ui_logic.UiSettings`
    (votes beside the service's reports when None); runs: the Train tab's
    `serve.training_runs.TrainingRuns` (`training_runs` makes it; None: no Train tab)."""
    from serve.api import ApiLimits, build_api
    from serve.preferences import PreferenceLog
    from serve.ui import mount_ui
    from serve.ui_logic import UiSettings

    preferences = PreferenceLog((ui or UiSettings()).preferences_file(service.config.reports))
    app = mount_ui(build_api(service, access.api_key, limits or ApiLimits(), fleet), service, access, preferences, runs)
    app.add_middleware(ThrottleMiddleware, throttle=FailureThrottle(access.throttle))
    return app


def training_runs(service, ui=None):
    """The Train tab's runs: on the server's base, publishing into its store, reading datasets from
    the `ui` settings' data roots; a finished run refreshes the registry at once, so the adapter
    (or its candidate, behind the promotion gate) is served without waiting for the watcher.
    None when the settings name no data root. A root that does not exist is made; ValueError names
    one that is not a folder."""
    from serve.training_runs import TrainingRuns, TrainingRunsSettings
    from serve.ui_logic import UiSettings

    ui = ui or UiSettings()
    if not ui.train_data_roots:
        return None
    roots = tuple(Path(r) for r in ui.train_data_roots)
    for root in roots:
        if not root.exists():  # a fresh checkout has no data/ until `make data`: uploads still need a home
            root.mkdir(parents=True)
            log.info("created the Train tab's data root %s", root)
    settings = TrainingRunsSettings(data_roots=roots,
                                    store_dir=service.registry.store.root, base=service.config.base,
                                    runs_dir=Path(ui.train_runs_dir), reports_dir=Path(service.config.reports))
    return TrainingRuns(settings, on_finished=lambda _run, _progress: service.refresh())


def bind(access: AccessConfig) -> socket.socket:
    """A socket bound to the server's address, taken before anything slow starts, so that a port
    in use or an address this machine lacks fails at once (OSError); uvicorn listens on it."""
    family = socket.AF_INET6 if ":" in access.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind((access.host, access.port))
    except OSError:
        sock.close()
        raise
    return sock


def _exit_on_signal(_signum: int, _frame) -> None:
    raise SystemExit(0)  # asked to stop, and stopped cleanly


def run(service, access: AccessConfig, sock: socket.socket, limits=None, fleet=None, ui=None) -> None:
    """Serve on `sock` (from `bind`) until SIGINT or SIGTERM; requests still running
    GRACEFUL_SHUTDOWN_S later are cancelled. uvicorn then raises the signal again; for SIGTERM
    that is SystemExit(0) here, so the caller's cleanup (`Service.close`) runs before the process ends."""
    import signal

    import uvicorn

    signal.signal(signal.SIGTERM, _exit_on_signal)  # the handler uvicorn restores and re-raises into

    runs = training_runs(service, ui)
    app = make_app(service, access, limits, fleet, ui, runs)
    warning = exposure_warning(access)
    if warning:
        print(warning, file=sys.stderr)
    host = f"[{access.host}]" if ":" in access.host else access.host
    print(f"loraswap serving on http://{host}:{access.port}  (UI at /, API at /v1)", file=sys.stderr)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if runs is not None:
            runs.close()  # a run still going is stopped: nothing half-trained is published
