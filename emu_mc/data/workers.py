"""Decode threads that a stuck sample cannot take down with it.

A sample whose read or decode never returns (a hung network filesystem, a pathological video) is
given up on by the loader after `data.sample_timeout_s`; its thread stays blocked. The threads here
are daemons, so such a thread never keeps the process from exiting (a ThreadPoolExecutor's threads
are joined at interpreter exit, which would turn one stuck sample into a hung job).
"""
import queue
import threading
from concurrent.futures import Future
from typing import Callable, List


class DaemonThreadPool:
    """`submit(fn, *args) -> Future`, run by `num_threads` daemon threads in submission order."""

    def __init__(self, num_threads: int, name: str = "emu-data"):
        self._tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(num_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, fn, args = task
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel what has not started; idle threads exit, busy ones when their task returns."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
