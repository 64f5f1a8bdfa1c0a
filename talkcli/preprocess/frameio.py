"""Reading and writing the workspace's frame images off the main thread.

PNG decoding and encoding release the GIL, as do mediapipe's graphs and ffmpeg in its own
process, so on two cores the image I/O overlaps with the model that consumes the frames. Both
directions keep a small bounded number of frames in flight: memory does not grow with the video.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..errors import InputError

T = TypeVar("T")
_DONE = object()


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"cannot read frame {path}; rerun with --force to rebuild the frames")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_image(path: Path, img: np.ndarray, params: list[int] | None = None) -> None:
    """Encode in memory (format from the suffix; ``img`` as cv2 stores it: BGR or grey) and write
    with Python, so that a full disk or a read-only directory raises OSError (cv2.imwrite would
    print libpng errors and return False)."""
    import cv2

    ok, data = cv2.imencode(Path(path).suffix, img, params or [])
    if not ok:
        raise InputError(f"could not encode {Path(path).name}")
    with open(path, "wb") as fh:
        fh.write(data.tobytes())


def prefetch(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Produce ``items`` in a background thread, at most ``depth`` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


def read_frames(paths: Iterable[Path], depth: int = 4) -> Iterator[np.ndarray]:
    """RGB frames of the workspace, decoded ahead in a background thread."""
    return prefetch((read_rgb(p) for p in paths), depth)


class BackgroundWriter:
    """``with BackgroundWriter() as w: w.submit(fn, *args)``: runs writes on 2 threads, at most
    ``in_flight`` pending; the first failure (a full disk, say) is raised in the caller."""

    def __init__(self, in_flight: int = 8, workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._pending: deque[Future] = deque()
        self._limit = in_flight

    def submit(self, fn: Callable[..., None], *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._limit or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)
