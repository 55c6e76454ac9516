"""The local scheduler of ``visitas run``: Luigi's answers, with less walking of the graph."""

import time

import luigi.scheduler
from luigi.scheduler import DISABLED, DONE, FAILED, PENDING

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
