"""The registration lock: mutual exclusion per registered model name through the MLflow registry itself, so it
works against any tracking store (a local SQLite file or a shared server). See RegistrationLock."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
from mlflow.exceptions import MlflowException

from pipelines.common.runner import StageError, stage_log

log = stage_log("register")


class LockLost(StageError):
    """This holder's registration lock was taken over (it looked abandoned): what it decided must not be written."""


def error_code(exc: MlflowException) -> str:
    return str(getattr(exc, "error_code", ""))


IDENTITY_KEYS = ("host", "boot_id", "pid", "pid_started")  # lock tags naming the holder's process


def _process_identity() -> dict[str, str]:
    """This process, precisely enough for a waiter on the same machine to tell whether it still runs."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return {
        "host": socket.gethostname(),
        "boot_id": boot.read_text().strip() if boot.exists() else "",
        "pid": str(os.getpid()),
        "pid_started": f"{psutil.Process().create_time():.3f}",
    }


def _exited_here(holder: dict[str, str], mine: dict[str, str]) -> bool:
    """True when the holder ran on this machine (same host name and boot) and its process is gone, or its pid now
    belongs to a process started at another time. Anything unknown (another machine, an older lock without
    these tags) is False: that lock expires by its silence."""
    if (
        not holder["pid"]
        or not holder["boot_id"]
        or (holder["host"], holder["boot_id"]) != (mine["host"], mine["boot_id"])
    ):
        return False
    try:
        started = psutil.Process(int(holder["pid"])).create_time()
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False
    return abs(started - float(holder["pid_started"] or 0)) > 1.0


class RegistrationLock:
    """Mutual exclusion per model name through the registry itself: a registered model `<name>.registration-lock`.

    - acquire: create that registered model. Creating a name is atomic (one creator wins), and its tags are
      written in the same transaction, so the lock is born with this holder's random `owner` token.
    - renew: while held, a thread rewrites the lock's description (a heartbeat counter) every timeout_s / 4,
      after checking that the owner is still this token (it stops, and marks the lock lost, when it is not).
    - expire: a waiter watches the lock's (owner, description, last update); if nothing changed for timeout_s
      on the waiter's own monotonic clock, the holder is gone: the waiter re-reads the lock, deletes it only if
      it is still that same unrenewed lock, and competes to create it again. No two clocks are ever compared.
      A holder that renews is waited for however long it holds the lock (a long re-evaluation). A holder that
      ran on the waiter's own machine (same host name and boot) and whose process has exited is taken over at
      once: a registration killed on a laptop does not hold up the next one for timeout_s.
    - own: `ensure()` raises LockLost unless the owner tag is still this token; call it before every write the
      lock protects. Release deletes the lock only if it is still this token's.

    Remaining window (the registry has no compare-and-set): "re-read then delete" (takeover) and "ensure() then
    write" are each two calls. A holder that stops renewing for timeout_s, or two waiters taking over the same
    abandoned lock at the same instant, can leave two processes believing they hold it; the loser finds out at
    its next ensure(), so at most the one write it had already checked for can land. Keep timeout_s well above
    the longest pause a holder can suffer (GC, swapping, a stalled tracking server).
    """

    def __init__(self, client, name: str, timeout_s: float):
        self.client, self.name, self.timeout_s = client, f"{name}.registration-lock", timeout_s
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self.identity = _process_identity()
        self._stop, self._lost = threading.Event(), threading.Event()
        self._beat: threading.Thread | None = None

    def _describe(self, beat: int) -> str:
        return (
            f"quill registration lock held by {self.holder} (heartbeat {beat}); taken over by the next "
            f"registration once it stops renewing for registry.lock_timeout_s"
        )

    def _observe(self) -> tuple | None:
        """What a waiter compares over time: (owner, description, last update); None when there is no lock."""
        try:
            held = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in error_code(exc) or "not found" in str(exc).lower():
                return None
            raise
        identity = tuple(held.tags.get(k, "") for k in IDENTITY_KEYS)
        return held.tags.get("owner"), held.description, held.last_updated_timestamp, identity

    def _create(self) -> bool:
        try:
            self.client.create_registered_model(
                self.name,
                tags={"owner": self.token, "holder": self.holder, **self.identity},
                description=self._describe(0),
            )
            return True
        except MlflowException as exc:
            if "ALREADY_EXISTS" in error_code(exc) or "already exists" in str(exc):
                return False
            raise

    def __enter__(self) -> RegistrationLock:
        seen, seen_since, told = None, time.monotonic(), False
        poll_s = min(1.0, self.timeout_s / 8)
        while True:
            if self._create():
                self._beat = threading.Thread(target=self._renew, name="registration-lock-heartbeat", daemon=True)
                self._beat.start()
                return self
            now, current = time.monotonic(), self._observe()
            if current is None:
                continue  # released meanwhile: try to create it again
            if _exited_here(dict(zip(IDENTITY_KEYS, current[3])), self.identity):
                self._take_over(current, "its holder ran on this machine and has exited")
                seen = None
                continue
            if current != seen:
                seen, seen_since = current, now  # a renewal (or a new holder): its silence starts now
            elif now - seen_since >= self.timeout_s:
                self._take_over(seen, f"not renewed for {now - seen_since:.0f} s (its holder is gone)")
                seen = None
                continue
            if not told:
                log(f"waiting for {self.name} ({(current[1] or '').split(';')[0]})")
                told = True
            time.sleep(poll_s)

    def _take_over(self, silent: tuple, why: str) -> None:
        if self._observe() != silent:
            return  # renewed or replaced meanwhile
        log(f"taking over {self.name}: {why}")
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException:
            pass  # deleted meanwhile by another waiter

    def _renew(self) -> None:
        beat = 0
        while not self._stop.wait(self.timeout_s / 4):
            try:
                current = self._observe()
                if current is None or current[0] != self.token:
                    self._lost.set()
                    return
                beat += 1
                self.client.update_registered_model(self.name, description=self._describe(beat))
            except Exception:  # noqa: BLE001 - a failed renewal is retried at the next beat; waiters see the silence
                continue

    def ensure(self) -> None:
        """Raise LockLost unless this holder still owns the lock (call it right before each protected write)."""
        current = None if self._lost.is_set() else self._observe()
        if current is None or current[0] != self.token:
            self._lost.set()
            raise LockLost(
                f"the registration lock {self.name} was taken over while this registration held it "
                f"({self.holder} did not renew it for registry.lock_timeout_s {self.timeout_s:g} s)"
            )

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        try:
            current = self._observe()
            if current is not None and current[0] == self.token:
                self.client.delete_registered_model(self.name)
        except MlflowException:
            pass  # a lock left behind is taken over after lock_timeout_s
