"""The local scheduler and worker of ``visitas run``: Luigi's answers, with less walking of the graph
and a shorter way for results."""

import itertools
import os
import sys
import threading
import time

import luigi
import luigi.execution_summary
import luigi.interface
import luigi.scheduler
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from luigi.scheduler import DISABLED, DONE, FAILED, PENDING

from visitas.ops import runner
from visitas.ops.runner import LocalScheduler

WORKER = "w"


def _graph(scheduler: luigi.scheduler.Scheduler) -> None:
    """Two chains, download <- validate <- load, of two files, and a step with no inputs."""
    for name in ("a", "b"):
        scheduler.add_task(worker=WORKER, task_id=f"download_{name}", status=PENDING)
        scheduler.add_task(worker=WORKER, task_id=f"validate_{name}", status=PENDING,
                           deps=[f"download_{name}"])
        scheduler.add_task(worker=WORKER, task_id=f"load_{name}", status=PENDING,
                           deps=[f"validate_{name}"])
    scheduler.add_task(worker=WORKER, task_id="prepare", status=PENDING)


def _both(**config) -> list[luigi.scheduler.Scheduler]:
    made = [luigi.scheduler.Scheduler(prune_on_get_work=True, record_task_history=False, **config),
            LocalScheduler(prune_on_get_work=False, record_task_history=False, **config)]
    for scheduler in made:
        _graph(scheduler)
    return made


def test_pending_counts_are_luigis_with_and_without_a_disabled_task(luigi_config):
    luigis, ours = _both(retry_count=1)
    assert ours.count_pending(WORKER) == luigis.count_pending(WORKER)
    assert ours.count_pending(WORKER)["n_pending_tasks"] == 7
    for scheduler in (luigis, ours):
        # A failure past retry_count disables the task: what depends on it is no longer pending.
        scheduler.add_task(worker=WORKER, task_id="download_a", status=FAILED)
        scheduler.add_task(worker=WORKER, task_id="download_b", status=DONE)
    # validate_a and load_a wait on a disabled task: validate_b, load_b and prepare remain.
    assert luigis.count_pending(WORKER)["n_pending_tasks"] == 3
    assert ours._state.get_active_task_count_for_status(DISABLED) == 1
    assert ours.count_pending(WORKER) == luigis.count_pending(WORKER)


def test_work_is_handed_out_in_luigis_order():
    luigis, ours = _both()
    for _ in range(7):
        given = [scheduler.get_work(worker=WORKER)["task_id"] for scheduler in (luigis, ours)]
        assert given[0] == given[1]
        for scheduler in (luigis, ours):
            scheduler.add_task(worker=WORKER, task_id=given[0], status=DONE)
    assert ours.get_work(worker=WORKER)["task_id"] is None


def test_a_failed_task_is_handed_out_again_after_retry_delay():
    scheduler = LocalScheduler(prune_on_get_work=False, record_task_history=False,
                               retry_delay=0.2, retry_count=5)
    scheduler.add_task(worker=WORKER, task_id="load_a", status=PENDING)
    assert scheduler.get_work(worker=WORKER)["task_id"] == "load_a"
    scheduler.add_task(worker=WORKER, task_id="load_a", status=FAILED)
    assert scheduler.get_work(worker=WORKER)["task_id"] is None
    time.sleep(LocalScheduler.PRUNE_EVERY + 0.2)  # past the retry delay and the next prune
    assert scheduler.get_work(worker=WORKER)["task_id"] == "load_a"


STEPS = ("download", "validate", "load")


@st.composite
def _runs(draw):
    """Files (a priority each, maybe a step that fails, maybe a resource), then events between
    two requests for work: a step done earlier found incomplete again, a new file's steps, a
    file's priority raised."""
    file = st.tuples(st.integers(0, 3), st.sampled_from((None, *STEPS)), st.booleans())
    files = draw(st.lists(file, min_size=1, max_size=5))
    events = draw(st.dictionaries(st.integers(0, 10), st.one_of(
        st.just(("redo", None)), st.tuples(st.just("file"), file),
        st.tuples(st.just("raise"), st.integers(0, 4))), max_size=4))
    return files, events, draw(st.sampled_from((1, 3)))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # neither holds state
@given(_runs())
def test_work_and_counts_are_luigis_whatever_fails_or_comes_back(luigi_config, monkeypatch, run):
    files, events, retry_count = run
    # Every task gets its own creation time (ties would be broken by each one's iteration order).
    clock = itertools.count(1_000_000)
    monkeypatch.setattr(luigi.scheduler.time, "time", lambda: next(clock) / 1000)
    # No cooldown: a step done is pending again as soon as it is found incomplete.
    config = dict(record_task_history=False, retry_count=retry_count, stable_done_cooldown_secs=0)
    made = [luigi.scheduler.Scheduler(prune_on_get_work=True, **config),
            LocalScheduler(prune_on_get_work=False, **config)]
    failing: set[str] = set()
    done: list[str] = []

    def add_file(index: int, priority: int, fails: str | None, needs_resource: bool) -> None:
        for scheduler in made:
            previous = ["prepare"]
            for step in STEPS:
                task_id = f"{step}_{index}"
                scheduler.add_task(worker=WORKER, task_id=task_id, status=PENDING, deps=previous,
                                   priority=priority,
                                   resources={"db": 1} if needs_resource and step == "load" else None)
                previous = [task_id]
        if fails:
            failing.add(f"{fails}_{index}")

    for scheduler in made:
        scheduler.add_task(worker=WORKER, task_id="prepare", status=PENDING)
    for index, file in enumerate(files):
        add_file(index, *file)
    handed_out = 0
    for turn in range(60):
        replies = [scheduler.get_work(worker=WORKER, current_tasks=[]) for scheduler in made]
        assert replies[1] == replies[0]
        assert made[1].count_pending(WORKER) == made[0].count_pending(WORKER)
        task_id = replies[0]["task_id"]
        if task_id is None:
            break
        handed_out += 1
        status = FAILED if task_id in failing else DONE
        for scheduler in made:
            scheduler.add_task(worker=WORKER, task_id=task_id, status=status)
        if status == DONE:
            done.append(task_id)
        kind, what = events.get(turn, (None, None))
        if kind == "redo" and done:  # the oldest step done is found incomplete again
            again = done.pop(0)
            for scheduler in made:
                scheduler.add_task(worker=WORKER, task_id=again, status=PENDING)
        elif kind == "file":
            add_file(len(files) + turn, *what)
        elif kind == "raise":
            for scheduler in made:
                scheduler.add_task(worker=WORKER, task_id=f"load_{what % len(files)}",
                                   status=PENDING, priority=10 + turn)
    assert handed_out >= 1


def test_a_second_worker_gets_luigis_answers(luigi_config):
    """Shared tasks (as with luigid, which this scheduler never is): Luigi's own counts."""
    made = [luigi.scheduler.Scheduler(prune_on_get_work=True, record_task_history=False),
            LocalScheduler(prune_on_get_work=False, record_task_history=False)]
    for scheduler in made:
        for worker in (WORKER, "other"):
            scheduler.add_task(worker=worker, task_id="prepare", status=PENDING)
            scheduler.add_task(worker=worker, task_id=f"load_{worker}", status=PENDING,
                               deps=["prepare"])
    first = None
    for worker in (WORKER, "other", WORKER, "other"):
        replies = [scheduler.get_work(worker=worker, current_tasks=[]) for scheduler in made]
        assert replies[1] == replies[0]
        first = first or replies[0]
        for scheduler in made:
            if replies[0]["task_id"]:
                scheduler.add_task(worker=worker, task_id=replies[0]["task_id"], status=DONE)
    # prepare is both workers': pending for this one, but not its alone.
    assert (first["n_pending_tasks"], first["n_unique_pending"]) == (2, 1)


class _Step(luigi.Task):
    """Writes its pid.  Its name says what it does: ``child``, run with a timeout, which makes Luigi
    run it in a child process; ``broken``, fails; ``yields``, requires another step as it runs."""

    root = luigi.Parameter()
    name = luigi.Parameter()
    AFTER = {"here": "first", "in_a_child": "here", "after_broken": "broken"}

    @property
    def worker_timeout(self):
        return 120 if "child" in self.name else None

    def requires(self):
        after = self.AFTER.get(self.name)
        return [_Step(root=self.root, name=after)] if after else []

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, self.name))

    def run(self):
        if self.name == "yields":
            yield _Step(root=self.root, name="yielded_to_a_child")
        if "broken" in self.name:
            raise RuntimeError(f"{self.name} fails")
        with self.output().open("w") as out:
            out.write(str(os.getpid()))


def _steps(root: str) -> list[luigi.Task]:
    return [_Step(root=root, name=name) for name in (
        "here", "first", "in_a_child", "yields", "broken", "broken_child", "after_broken")]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_worker_gets_every_result_of_tasks_run_here_or_in_a_child(luigi_config, tmp_path,
                                                                       workers):
    """``visitas run``'s worker takes results of tasks it ran itself (inline with one worker, in
    its threads with two) from a list, those of child processes from Luigi's queue: the same
    outcome as Luigi's own worker.  A step with a timeout runs in a child either way; with two
    workers Luigi runs every step in a child, ``visitas run`` none of the others."""
    luigi_config.set("worker", "no_install_shutdown_handler", "true")  # run from a thread
    outcomes = {}
    for label, factory in (("luigi", luigi.interface._WorkerSchedulerFactory()),
                           ("ours", runner._SchedulerFactory())):
        root = tmp_path / label
        root.mkdir()
        results = []
        build = threading.Thread(target=lambda: results.append(luigi.build(
            _steps(str(root)), worker_scheduler_factory=factory, detailed_summary=True,
            local_scheduler=True, workers=workers)), daemon=True)
        build.start()
        build.join(120)  # a result that never arrives leaves the worker waiting for good
        assert results, f"{label}: the worker still waits for a task's result"
        summary = luigi.execution_summary._summary_dict(results[0].worker)
        outcomes[label] = {status: sorted(task.name for task in tasks)
                           for status, tasks in summary.items() if tasks}
        pids = {path.name: int(path.read_text()) for path in root.iterdir()}
        here = sorted(name for name, pid in pids.items() if pid == os.getpid())
        assert here == ([] if label == "luigi" and workers > 1 else ["first", "here", "yields"])
        assert pids["in_a_child"] != os.getpid() and pids["yielded_to_a_child"] != os.getpid()
    assert outcomes["ours"] == outcomes["luigi"]
    assert outcomes["ours"]["completed"] == ["first", "here", "in_a_child", "yielded_to_a_child",
                                             "yields"]
    assert outcomes["ours"]["failed"] == ["broken", "broken_child"]
    assert outcomes["ours"]["upstream_failure"] == ["after_broken"]


_MEETING = threading.Barrier(2)


class _Meets(luigi.Task):
    """Runs until the other ``_Meets`` runs too (or 60 s pass: then it fails), and writes the
    thread and process it ran in."""

    root = luigi.Parameter()
    name = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(os.path.join(self.root, self.name))

    def run(self):
        _MEETING.wait(60)
        with self.output().open("w") as out:
            out.write(f"{os.getpid()} {threading.current_thread().name}")


def test_two_workers_run_two_steps_at_once_in_threads_of_this_process(luigi_config, tmp_path):
    luigi_config.set("worker", "no_install_shutdown_handler", "true")
    _MEETING.reset()
    results = []
    build = threading.Thread(target=lambda: results.append(luigi.build(
        [_Meets(root=str(tmp_path), name=name) for name in ("a", "b")],
        worker_scheduler_factory=runner._SchedulerFactory(), detailed_summary=True,
        local_scheduler=True, workers=2)), daemon=True)
    build.start()
    build.join(120)
    assert results and results[0].scheduling_succeeded
    summary = luigi.execution_summary._summary_dict(results[0].worker)
    assert sorted(task.name for task in summary["completed"]) == ["a", "b"]
    ran = [tmp_path.joinpath(name).read_text().split() for name in ("a", "b")]
    assert {int(pid) for pid, _ in ran} == {os.getpid()}
    assert all(thread.startswith("slot") for _, thread in ran)
    assert ran[0][1] != ran[1][1]


class _Keeping(runner._SchedulerFactory):
    """The factory of ``visitas run``, keeping the worker it makes (for luigid's messages)."""

    worker = None

    def create_worker(self, scheduler, worker_processes, assistant=False):
        self.worker = super().create_worker(scheduler, worker_processes, assistant)
        return self.worker


def test_a_worker_count_luigid_raises_mid_run_runs_that_many_steps_at_once(
        luigi_config, tmp_path, monkeypatch):
    """luigid's "set workers" (Luigi's set_worker_processes) from 2 to 3 while two steps run:
    the third starts at once, in a third thread (three steps that wait for each other)."""
    luigi_config.set("worker", "no_install_shutdown_handler", "true")
    meeting = threading.Barrier(3)
    monkeypatch.setattr(sys.modules[__name__], "_MEETING", meeting)
    factory = _Keeping()
    results = []
    build = threading.Thread(target=lambda: results.append(luigi.build(
        [_Meets(root=str(tmp_path), name=name) for name in ("a", "b", "c")],
        worker_scheduler_factory=factory, detailed_summary=True, local_scheduler=True,
        workers=2)), daemon=True)
    build.start()
    deadline = time.monotonic() + 60
    while meeting.n_waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert meeting.n_waiting == 2  # two steps under way, the third held back by the count
    factory.worker.set_worker_processes(3)
    build.join(120)
    assert results and results[0].scheduling_succeeded
    summary = luigi.execution_summary._summary_dict(results[0].worker)
    assert sorted(task.name for task in summary["completed"]) == ["a", "b", "c"]
    threads = {tmp_path.joinpath(name).read_text().split()[1] for name in ("a", "b", "c")}
    assert len(threads) == 3 and all(thread.startswith("slot") for thread in threads)
