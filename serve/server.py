"""One server: the Gradio UI at / and the OpenAI-compatible API at /v1, on one engine.

`python -m serve web` (what `make serve` runs). Loopback by default; UI login with --auth (or a
file, or $LORASWAP_AUTH), the API behind a bearer token with --api-key (or $LORASWAP_API_KEY).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccessConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[tuple[str, str], ...] = ()
    """UI logins (user, password); empty: no login."""
    api_key: str | None = None


def parse_logins(text: str, source: str) -> tuple[tuple[str, str], ...]:
    """'user:password' entries, one per line or comma-separated."""
    logins = []
    for n, item in enumerate(x.strip() for x in text.replace(",", "\n").splitlines()):
        if not item or item.startswith("#"):
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{source}: entry {n + 1} is not user:password")
        logins.append((user, password))
    return tuple(logins)


def access_from(args) -> AccessConfig:
    logins: tuple[tuple[str, str], ...] = ()
    if args.auth:
        logins += parse_logins(args.auth, "--auth")
    if args.auth_file:
        logins += parse_logins(Path(args.auth_file).read_text(), args.auth_file)
    if not logins and os.environ.get("LORASWAP_AUTH"):
        logins = parse_logins(os.environ["LORASWAP_AUTH"], "$LORASWAP_AUTH")
    api_key = args.api_key or os.environ.get("LORASWAP_API_KEY") or None
    return AccessConfig(args.host, args.port, logins, api_key)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(access: AccessConfig) -> str | None:
    """What to tell someone binding beyond loopback without protection."""
    if is_loopback(access.host):
        return None
    missing = [what for what, on in (("--auth (UI login)", access.auth), ("--api-key (API token)", access.api_key)) if not on]
    if not missing:
        return None
    return (f"WARNING: serving on {access.host}, reachable from other machines, without {' or '.join(missing)}: "
            "anyone who can reach this port can use it. Keep 127.0.0.1, or set both, ideally behind a TLS proxy.")


def make_app(service, access: AccessConfig):
    """The FastAPI app: API routes first, the Gradio UI mounted at /."""
    from serve.api import build_api
    from serve.ui import mount_ui

    return mount_ui(build_api(service, access.api_key), service, access)


def run(service, access: AccessConfig) -> None:
    import uvicorn

    warning = exposure_warning(access)
    if warning:
        print(warning, file=sys.stderr)
    print(f"loraswap serving on http://{access.host}:{access.port}  (UI at /, API at /v1)", file=sys.stderr)
    uvicorn.run(make_app(service, access), host=access.host, port=access.port, log_level="warning")
