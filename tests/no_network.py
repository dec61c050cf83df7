"""A machine without network, made deterministic: proxies on a local port that refuses connections."""

import socket

# Every variable urllib reads a proxy (or an exception from proxies) from.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
PROXY_VARIABLES += ("ALL_PROXY", "all_proxy")


def closed_port() -> int:
    """A local TCP port nobody listens on: connecting to it is refused at once, network or not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(env) -> dict[str, str]:
    """`env` with every download going through a proxy that refuses connections (and no exceptions)."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    kept = {k: v for k, v in env.items() if k not in PROXY_VARIABLES}
    return {**kept, **dict.fromkeys(("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"), proxy)}
