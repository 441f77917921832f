"""
Bounds on the work the UI accepts: generation, search and scoring requests waiting or running, per client and in
total. A request over a bound is refused at once with a message naming the limit, never left to wait.
"""

from __future__ import annotations

import threading
from collections import Counter

from ..options import Limits


class Admission:
    r"""
    Counts the heavy requests in flight (waiting for the model or running), per client and in total.

    Args:
        limits ([`~headpag.options.Limits`]): `max_queue_per_client` and `max_queue` are used.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._by_client: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self._by_client.values())

    def clients(self) -> dict[str, int]:
        """Requests waiting or running, per client."""
        with self._lock:
            return dict(self._by_client)

    def count(self, client: str) -> int:
        return self._by_client[client]

    def enter(self, client: str, what: str = "request") -> Ticket:
        r"""
        Admit one request of `client`, or refuse it.

        Args:
            client (`str`): The client (see [`~headpag.app.security.client_id`]).
            what (`str`): What is requested, for the message.

        Returns:
            A [`Ticket`]; release it (or use it as a context manager) when the request ends.

        Raises:
            `ValueError`: naming the limit and the flag that raises it.
        """
        with self._lock:
            mine, total = self._by_client[client], self.total
            if mine + 1 > self.limits.max_queue_per_client:
                raise ValueError(
                    f"Refused {what}: you already have {mine} request(s) waiting or running, the limit "
                    f"max_queue_per_client={self.limits.max_queue_per_client}; wait for one to finish or cancel it "
                    f"(the server's operator can raise it with {Limits.flag('max_queue_per_client')})."
                )
            if total + 1 > self.limits.max_queue:
                raise ValueError(
                    f"Refused {what}: the server is busy with {total} request(s) waiting or running, the limit "
                    f"max_queue={self.limits.max_queue}; try again later (the server's operator can raise it with "
                    f"{Limits.flag('max_queue')})."
                )
            self._by_client[client] += 1
        return Ticket(self, client)

    def _release(self, client: str) -> None:
        with self._lock:
            self._by_client[client] -= 1
            if self._by_client[client] <= 0:
                del self._by_client[client]


class Ticket:
    """One admitted request; released once (further releases do nothing)."""

    def __init__(self, admission: Admission, client: str):
        self._admission, self.client = admission, client
        self._released = False
        self._guard = threading.Lock()

    def release(self) -> None:
        with self._guard:
            if self._released:
                return
            self._released = True
        self._admission._release(self.client)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
