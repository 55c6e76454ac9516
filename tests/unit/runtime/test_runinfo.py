"""Handles kept per thread: an execution slot keeps its own for the whole run, a forked child
makes its own."""

import multiprocessing
import threading

from visitas.runtime.runinfo import per_thread


def _handles():
    made = []

    @per_thread
    def handle():
        made.append(object())
        return made[-1]

    return handle, made


def test_a_thread_keeps_its_handle_and_another_thread_gets_its_own():
    handle, made = _handles()
    first = handle()
    assert handle() is first
    seen = []
    together = threading.Barrier(2)  # both alive at once (an ended thread's id may be reused)

    def ask():
        together.wait(60)
        seen.append((handle(), handle()))
        together.wait(60)

    others = [threading.Thread(target=ask) for _ in range(2)]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join(120)
    assert all(a is b for a, b in seen)  # each thread: one handle, asked twice
    assert len({id(first), *(id(a) for a, _ in seen)}) == 3 and len(made) == 3
    assert handle() is first


def _in_child(handle, made, answer) -> None:
    handle()
    answer.send(len(made))


def test_a_forked_child_makes_its_own_handle():
    handle, made = _handles()
    handle()
    context = multiprocessing.get_context("fork")  # as Luigi forks a step with a timeout
    parent_end, child_end = context.Pipe()
    child = context.Process(target=_in_child, args=(handle, made, child_end))
    child.start()
    assert parent_end.poll(60)
    assert parent_end.recv() == 2  # the parent's handle, then the child's own
    child.join(60)
    assert child.exitcode == 0
    assert len(made) == 1
