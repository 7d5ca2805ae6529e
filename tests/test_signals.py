"""The runtime's blinker signals: one namespace, instance id as sender, and a receiver
that raises does not silence the others."""

from __future__ import annotations

import logging
import time
from typing import Any

import blinker
import pytest

import llama_actors.signals
from llama_actors._runtime.signals import emit
from llama_actors.signals import ALL_SIGNALS, health_changed, instance_ready, signals


class Recorder:
    """A receiver keeping (sender, keywords) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        self.calls.append((sender, kwargs))


def test_every_signal_lives_in_the_library_namespace() -> None:
    assert llama_actors.signals.signals is signals
    assert len(ALL_SIGNALS) == 12
    for key, signal in ALL_SIGNALS.items():
        assert signals[signal.name] is signal
        assert key == signal.name.replace("-", "_")
        assert getattr(llama_actors.signals, key) is signal
        assert blinker.signal(signal.name) is not signal  # not the global namespace
    # probe_completed is for metrics, not a transition, so ALL_SIGNALS leaves it out.
    assert set(signals.values()) == {*ALL_SIGNALS.values(), llama_actors.signals.probe_completed}


def test_every_signal_has_a_doc() -> None:
    for signal in ALL_SIGNALS.values():
        assert signal.__doc__


def test_emit_passes_the_instance_id_as_sender_and_keyword_and_the_time() -> None:
    recorder = Recorder()
    before = time.time()
    with health_changed.connected_to(recorder):
        emit(health_changed, "chat-1", old="healthy", new="degraded", reason="slow probe")
    after = time.time()
    [(sender, kwargs)] = recorder.calls
    assert sender == "chat-1"
    assert kwargs["instance_id"] == "chat-1"
    assert kwargs["old"] == "healthy"
    assert kwargs["new"] == "degraded"
    assert kwargs["reason"] == "slow probe"
    assert before <= kwargs["at"] <= after


def test_emit_keeps_a_time_given_by_the_caller() -> None:
    recorder = Recorder()
    with health_changed.connected_to(recorder):
        emit(health_changed, "chat-1", old="a", new="b", reason="r", at=12.5)
    assert recorder.calls[0][1]["at"] == 12.5


def test_a_receiver_for_one_instance_only_hears_that_instance() -> None:
    only_a = Recorder()
    everyone = Recorder()
    with instance_ready.connected_to(only_a, sender="a"), instance_ready.connected_to(everyone):
        emit(instance_ready, "a", pid=1, port=41000)
        emit(instance_ready, "b", pid=2, port=41001)
        emit(instance_ready, "ab", pid=3, port=41002)
    assert [sender for sender, _ in only_a.calls] == ["a"]
    assert only_a.calls[0][1]["pid"] == 1
    assert [sender for sender, _ in everyone.calls] == ["a", "b", "ab"]


def test_a_sender_filter_matches_an_equal_string_built_at_run_time() -> None:
    only_chat = Recorder()
    instance_id = "".join(["chat-", "1a2b3c"])
    with instance_ready.connected_to(only_chat, sender="chat-1a2b3c"):
        emit(instance_ready, instance_id, pid=1)
    assert len(only_chat.calls) == 1


@pytest.mark.logs_errors("a receiver of health-changed raised")
def test_a_receiver_that_raises_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="llama_actors.signals")
    first = Recorder()
    last = Recorder()

    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    with (
        health_changed.connected_to(first),
        health_changed.connected_to(broken),
        health_changed.connected_to(last),
    ):
        emit(health_changed, "chat-1", old="healthy", new="unavailable", reason="exited")
    assert len(first.calls) == 1
    assert len(last.calls) == 1
    records = [r for r in caplog.records if r.name == "llama_actors.signals"]
    assert len(records) == 1
    assert "health-changed" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert "receiver bug" in str(records[0].exc_info[1])


def test_every_transition_is_one_log_line_naming_the_instance_and_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from llama_actors._runtime.signals import instance_failed, probe_completed

    caplog.set_level(logging.DEBUG, logger="llama_actors.transitions")
    emit(health_changed, "chat-1", old="healthy", new="degraded", reason="probe slow (0.7s)")
    emit(instance_failed, "chat-1", reason="5 restarts in 60s", exit=None)
    emit(probe_completed, "chat-1", latency_s=0.001, verdict="healthy")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.WARNING, "instance chat-1: health healthy -> degraded (probe slow (0.7s))"),
        (logging.ERROR, "instance chat-1: failed (5 restarts in 60s)"),
    ]
