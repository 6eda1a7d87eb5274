"""Terminal progress for `submit`: a live bar on a TTY, plain event lines otherwise.

On a terminal one line is redrawn in place:

    [########------------] 4/10 done · 1 failed · 2 running | dog 37/400 0.112 | cat 5/400

and finished / failed / retried subjects are printed above it as they happen. When
the output is not a terminal (a Ray Job's log, CI, CliRunner) only the event lines are
printed, plus a "running: ..." line every `log_interval_s`.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

BAR_WIDTH = 20


class ProgressDisplay:
    def __init__(self, total_subjects: int, already_done: int = 0,
                 stream: TextIO | None = None, live: bool | None = None,
                 log_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total = total_subjects
        self.done = already_done
        self.failed = 0
        self.running: dict[str, str] = {}       # job_id -> actor
        self.members: dict[str, int] = {}       # job_id -> number of subjects
        self.steps: dict[str, dict[str, Any]] = {}
        self.log_interval_s = log_interval_s
        self.clock = clock
        self._last_log = clock()
        self._drawn = False
        self._last_text = ""

    # -- inputs -----------------------------------------------------------------------

    def event(self, event: dict[str, Any]) -> None:
        job = event.get("job")
        kind = event["event"]
        if kind == "started":
            self.running[job.job_id] = event["actor"]
            self.members[job.job_id] = len(job.subjects)
            retry = f" (attempt {event['attempt']})" if event["attempt"] > 1 else ""
            if not self.live:
                self._print(f"started  {job.job_id} on {event['actor']}{retry}")
        elif kind == "finished":
            self.running.pop(job.job_id, None)
            self.steps.pop(job.job_id, None)
            result = event["result"]
            n = len(job.subjects)
            if result["status"] == "done":
                self.done += n
                loss = result.get("final_loss")
                loss_text = f"loss {loss:.4f}, " if isinstance(loss, float) else ""
                self._print(f"done     {job.job_id} ({loss_text}{result.get('seconds', 0):.1f} s)"
                            f"  [{self.done}/{self.total}]")
            else:
                self.failed += n
                self._print(f"FAILED   {job.job_id}: {result.get('reason', '')}")
        elif kind == "retry":
            self.running.pop(job.job_id, None)
            self.steps.pop(job.job_id, None)
            what = "hung" if event["reason"].startswith("timed out") else "died"
            self._print(f"retry    {job.job_id}: actor {event['actor']} {what} "
                        f"(attempt {event['attempt']}): {event['reason'][:160]}")
        elif kind == "replaced":
            self._print(f"actor    {event['actor']} replaced by {event['new_actor']}")
        elif kind == "shrunk":
            self._print(f"actor    {event['actor']} dropped ({event['reason']}); "
                        f"{event['actors_left']} actor(s) left")
        self.redraw()

    def update_steps(self, snapshot: dict[str, dict[str, Any]]) -> None:
        """Per-job step progress from the ProgressTracker actor."""
        self.steps = {job_id: state for job_id, state in snapshot.items()
                      if job_id in self.running}
        if not self.live and self.running and self.clock() - self._last_log >= self.log_interval_s:
            self._last_log = self.clock()
            self._print("running: " + self._running_text())
        self.redraw()

    # -- output -----------------------------------------------------------------------

    def line(self) -> str:
        finished = self.done + self.failed
        filled = round(BAR_WIDTH * finished / self.total) if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        running = sum(self.members.get(j, 1) for j in self.running)
        text = (f"[{bar}] {self.done}/{self.total} done · {self.failed} failed · "
                f"{running} running")
        if self.running:
            text += " | " + self._running_text()
        return text

    def _running_text(self) -> str:
        parts = []
        for job_id in self.running:
            state = self.steps.get(job_id)
            if state and state.get("total"):
                loss = state.get("loss")
                loss_text = f" {loss:.3f}" if isinstance(loss, float) else ""
                parts.append(f"{job_id} {state['step']}/{state['total']}{loss_text}")
            else:
                parts.append(f"{job_id} loading")
        return " | ".join(parts)

    def redraw(self) -> None:
        if not self.live:
            return
        width = shutil.get_terminal_size((100, 20)).columns
        text = self.line()
        if len(text) > width - 1:
            text = text[: width - 4] + "..."
        if self._drawn and text == self._last_text:
            return
        self._last_text = text
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False

    def _print(self, text: str) -> None:
        if self.live and self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()
