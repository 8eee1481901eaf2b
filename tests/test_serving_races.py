"""Races inside the daemon's serving layer, with the interleaving forced (issue 15, defects 7
and 8). In-process: the real dispatcher, sessions, segments and model queues; the only
stand-ins are hooks that pause a thread at the instant the race needs."""

from __future__ import annotations

import os
import threading
import time

import torch

from tensord.models.base import BatchPolicy
from tensord.models.builtin import builtin_models
from tensord.serving.dispatcher import Dispatcher
from tensord.serving.executor import Executor
from tensord.serving.scheduler import ModelQueue
from tensord.serving.session import Job, Session
from tensord.transport.segment import EFD_REQ_DATA, Segment


class _PausingEpoll:
    """Wraps the dispatcher's epoll: when a poll returns an event for `fd`, it tells the
    test and waits until the test lets the dispatcher go on with that (by then stale) event."""

    def __init__(self, ep, fd: int):
        self.ep, self.fd = ep, fd
        self.holding = threading.Event()
        self.go = threading.Event()
        self.polls_after = threading.Event()

    def poll(self, timeout=-1):
        if self.go.is_set():
            self.polls_after.set()
        events = self.ep.poll(timeout if not self.go.is_set() else min(timeout, 0.05)
                              if timeout != -1 else 0.05)
        if not self.go.is_set() and any(fd == self.fd for fd, _ in events):
            self.holding.set()
            self.go.wait(30)
        return events

    def __getattr__(self, name):
        return getattr(self.ep, name)


def test_a_stale_epoll_event_never_reads_a_reused_descriptor():
    """Defect 7: the dispatcher holds an event for a session's eventfd while the control
    thread ends the session and the next accept() gets the same descriptor number. Reading
    the stale event must not take another file's bytes; the eventfd is closed afterwards."""
    d = Dispatcher(scheduler=None, spin_us=0)
    seg = Segment.create("races", 65536, 65536)
    seg.close_fd()  # as after the welcome: the client holds the memfd, the daemon the eventfds
    session = Session("races", seg, registry=None, executor=None, on_fatal=lambda e: None)
    rd = seg.efds[EFD_REQ_DATA]
    ep = _PausingEpoll(d._ep, rd)
    d._ep = ep
    d.start()
    try:
        d.add(session)
        os.eventfd_write(rd, 1)  # the client publishes: the dispatcher's epoll reports rd
        assert ep.holding.wait(30), "the dispatcher never saw the event"
        session.end()  # what the control thread does when the connection closes
        d.remove(session)
        # The process opens descriptors (the next accept()s): if rd's number is free, one of
        # them gets it. The last one opened is the victim.
        fillers = []
        victim = os.eventfd(0, os.EFD_NONBLOCK)
        while victim < rd:
            fillers.append(victim)
            victim = os.eventfd(0, os.EFD_NONBLOCK)
        reused = victim == rd
        try:
            os.eventfd_write(victim, 7)
            ep.go.set()  # the dispatcher goes on with its stale event
            assert ep.polls_after.wait(30)
            time.sleep(0.1)  # and around its loop once more
            assert os.eventfd_read(victim) == 7, (
                f"the stale event read another file (descriptor number reused: {reused})")
        finally:
            for f in (victim, *fillers):
                os.close(f)
        end = time.monotonic() + 10
        while True:  # the dispatcher closes the session's eventfds itself, once
            try:
                os.fstat(rd)
            except OSError:
                break
            assert time.monotonic() < end, "the ended session's eventfd was never closed"
            time.sleep(0.01)
    finally:
        ep.go.set()
        d.stop()


class _Stopped:
    """A session that ended: the worker drops its job without answering."""

    stopped = True

    def finish(self, record, **kw):
        pass


def test_the_dispatcher_never_runs_a_model_a_worker_is_running():
    """Defect 8: between a worker taking a batch and starting it, the dispatcher must not
    see the model as idle and run it inline too (instances = 1 means one at a time)."""
    mlp = next(m for m in builtin_models() if m.name == "mlp")
    q = ModelQueue(mlp, BatchPolicy(max_batch_size=1), registry=None, executor=Executor(),
                   on_empty=lambda q: None)
    q.pass_us = 5.0  # measured fast: the dispatcher would like to run it inline
    formed, go = threading.Event(), threading.Event()
    original = q._form

    def pausing_form(batch=None):
        taken = original(batch)
        formed.set()
        go.wait(30)  # the worker holds its batch, not yet running it
        return taken

    q._form = pausing_form
    job = Job(_Stopped(), record=None, model=mlp, inputs=[torch.zeros(1, 16)], deadline=None,
              priority=0)
    try:
        q.put(job)
        assert formed.wait(30)
        verdict: list[bool] = []
        t = threading.Thread(target=lambda: verdict.append(q.claim_inline()))
        t.start()
        time.sleep(0.2)  # claim_inline takes the queue's lock: it answers once _take is done
        go.set()
        t.join(30)
        assert verdict == [False], "the dispatcher would have run the model alongside"
    finally:
        go.set()
        q.retire()
