"""Preparing a data set without network: fail at once instead of retrying, and leave data_dir as it was.

TFDS retries an unreachable download ten times with growing pauses (3.5 minutes when offline)
and leaves its folders behind. `downloads_fail_fast` checks each download's host (or its proxy)
with one short TCP connection first; `removed_on_failure` removes what a failed preparation
created, keeping only finished downloads.
"""

import contextlib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator

from etils import epath

PROBE_TIMEOUT_S = 3.0
_PORTS = {"http": 80, "https": 443, "ftp": 21}
_DEPTH = 3  # data_dir/downloads/<data set>/<file>.tmp.<id>: the deepest folder TFDS creates first.


def check_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raises ConnectionError when the host serving `url` (its proxy, if one is set) takes no TCP connection."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (parts.hostname or "", parts.port or _PORTS.get(parts.scheme, 443))
    reason = _connect(address, timeout)
    if reason:
        raise ConnectionError(f"cannot reach {address[0]}:{address[1]} ({reason}); is there a network?")


def _connect(address: tuple[str, int], timeout: float) -> str:
    """'' when a TCP connection to address opens within `timeout` (name lookup included), else why not."""
    outcome = []

    def attempt():  # In a thread: the name lookup itself has no timeout.
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append("")
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


@contextlib.contextmanager
def downloads_fail_fast() -> Iterator[None]:
    """TFDS downloads raise ConnectionError at once, without retries, when their host is unreachable."""
    from tensorflow_datasets.core.download import downloader

    open_url = getattr(downloader, "_open_url", None)  # TFDS's one network entry (4.9).
    if open_url is None:  # Another TFDS: its own retries apply.
        yield
        return

    def checked(url, **kwargs):
        check_reachable(url)
        return open_url(url, **kwargs)

    downloader._open_url = checked
    try:
        yield
    finally:
        downloader._open_url = open_url


@contextlib.contextmanager
def removed_on_failure(root: str) -> Iterator[None]:
    """On an exception (Ctrl-C included), removes what appeared under `root` meanwhile, but for finished
    downloads and extractions, which TFDS reuses on the next try; what was there before stays."""
    before = _tree(epath.Path(root))
    try:
        yield
    except BaseException:
        created = _tree(epath.Path(root)) - before
        kept = {p for p in created if _finished_download(p, epath.Path(root))}
        kept |= {parent for p in kept for parent in p.parents if parent in created}
        for path in created - kept:
            if path.parent in created and path.parent not in kept:
                continue  # It goes with its parent.
            if path.is_dir():
                path.rmtree()
            elif path.exists():
                path.unlink()
        raise


def _finished_download(path: epath.Path, root: epath.Path) -> bool:
    """<root>/downloads/<data set>/<file> or <root>/downloads/extracted/<archive>, not one of TFDS's
    temporaries (<file>.tmp.<id>/, incomplete.<id>_<archive>/)."""
    parts = path.relative_to(root).parts
    return len(parts) == 3 and parts[0] == "downloads" and ".tmp." not in parts[2] and "incomplete." not in parts[2]


def _tree(root: epath.Path) -> set[epath.Path]:
    """root and what lies under it, at most _DEPTH levels down."""
    if not root.exists():
        return set()
    found, level = {root}, [root]
    for _ in range(_DEPTH):
        level = [child for path in level if path.is_dir() for child in path.iterdir()]
        found.update(level)
    return found
