"""The service's state store, each test on SQLite and on a real PostgreSQL server (`store_url` in conftest).

Time is a hand-moved clock wherever a lease expires or an order depends on creation time, so no test sleeps.
"""

from __future__ import annotations

import threading

import pytest

from tunesmith.serve import store as store_module
from tunesmith.serve.store import Lease, Store

PROJECT, OTHER = "proj-a", "proj-b"


class Clock:
    """Stands in for the `time` module inside the store: seconds since the epoch, moved by the test."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(store_module, "time", clock)
    return clock


@pytest.fixture
def store(store_url):
    store = Store(store_url)
    store.ensure_project(PROJECT)
    store.ensure_project(OTHER)
    yield store
    store.close()


def add_file(store: Store, project: str = PROJECT) -> dict:
    return store.add_file(
        project, filename="train.jsonl", purpose="fine-tune", bytes=120, sha256="0" * 64, format="chat", examples=3
    )


def add_job(store: Store, project: str = PROJECT, training_file: str = "file-x", **values) -> dict:
    defaults = dict(model="tiny", method="supervised", hyperparameters={"n_epochs": "auto"}, seed=7, status="queued")
    return store.add_job(project, training_file=training_file, **{**defaults, **values})


def test_objects_of_one_project_are_invisible_from_another(store):
    file = add_file(store)
    job = add_job(store, training_file=file["id"])
    model_id = f"ft:tiny:demo:{job['id']}"
    store.add_model(PROJECT, model_id, job["id"], "tiny")

    assert store.file(OTHER, file["id"]) is None and store.files(OTHER) == []
    assert store.job(OTHER, job["id"]) is None and store.jobs(OTHER) == []
    assert store.model(OTHER, model_id) is None and store.models(OTHER) == []
    assert store.jobs_using_file(OTHER, file["id"]) == []
    # writes through the other project touch nothing
    assert not store.delete_file(OTHER, file["id"]) and not store.delete_model(OTHER, model_id)
    assert store.request_cancel(OTHER, job["id"]) is None
    assert store.job(PROJECT, job["id"])["status"] == "queued"

    assert [row["id"] for row in store.files(PROJECT)] == [file["id"]]
    assert [row["id"] for row in store.jobs(PROJECT)] == [job["id"]]
    assert [row["id"] for row in store.models(PROJECT)] == [model_id]
    assert [row["id"] for row in store.jobs(None)] == [job["id"]]  # the operator's view: every project
    assert store.delete_file(PROJECT, file["id"]) and store.file(PROJECT, file["id"]) is None


def test_job_lifecycle_from_validation_to_success(store, clock):
    job = add_job(store, status="validating_files", metadata={"team": "support"})
    assert job["status"] == "validating_files" and job["attempts"] == 0 and not job["cancel_requested"]
    assert job["hyperparameters"] == {"n_epochs": "auto"} and job["metadata"] == {"team": "support"}

    assert store.lease("worker-1", 30) is None  # not queued yet
    assert store.update_job(job["id"], ("validating_files",), status="queued", resolved={"n_epochs": 3})
    assert not store.update_job(job["id"], ("validating_files",), status="failed")  # already left validation

    lease = store.lease("worker-1", 30)
    assert lease.job["id"] == job["id"] and lease.job["status"] == "running"
    assert lease.job["lease_owner"] == "worker-1" and lease.job["attempts"] == 1
    assert lease.job["lease_expires"] == pytest.approx(clock.now + 30)
    assert lease.job["resolved"] == {"n_epochs": 3}

    clock.advance(20)
    assert store.renew(lease, 30)["lease_expires"] == pytest.approx(clock.now + 30)
    assert store.finish(lease, "succeeded", fine_tuned_model="ft:tiny::x", trained_tokens=1234)

    done = store.job(PROJECT, job["id"])
    assert done["status"] == "succeeded" and done["finished_at"] == int(clock.now)
    assert done["fine_tuned_model"] == "ft:tiny::x" and done["trained_tokens"] == 1234
    assert store.renew(lease, 30) is None and not store.finish(lease, "failed")  # no longer running
    assert store.lease("worker-2", 30) is None


def test_lease_takes_the_oldest_queued_job(store, clock):
    newer = add_job(store, created_at=int(clock.now) + 10)
    add_job(store, status="validating_files", created_at=int(clock.now) - 10)
    older = add_job(store, created_at=int(clock.now))

    assert store.lease("worker-1", 30).job["id"] == older["id"]
    assert store.lease("worker-2", 30).job["id"] == newer["id"]
    assert store.lease("worker-3", 30) is None


def test_an_expired_lease_passes_to_another_worker(store, clock):
    job = add_job(store)
    first = store.lease("worker-1", 10)
    clock.advance(9)
    assert store.lease("worker-2", 10) is None  # still held

    clock.advance(2)  # worker-1 stopped renewing: its lease ran out
    second = store.lease("worker-2", 10)
    assert second.job["id"] == job["id"] and second.job["lease_owner"] == "worker-2"
    assert second.job["attempts"] == 2

    assert store.renew(first, 10) is None  # worker-1 lost the job ...
    assert not store.finish(first, "succeeded")  # ... so it cannot finish it
    assert not store.finish(Lease(second.job, "intruder"), "failed")  # nor can anyone but the holder
    assert store.renew(second, 10) is not None and store.finish(second, "failed", error={"code": "boom"})
    assert store.job(PROJECT, job["id"])["error"] == {"code": "boom"}


def test_racing_workers_lease_a_job_exactly_once(store_url):
    # Two stores on one database: two worker processes, each with its own connections.
    workers = [Store(store_url), Store(store_url)]
    workers[0].ensure_project(PROJECT)
    try:
        for round_number in range(20):
            job = add_job(workers[0])
            barrier = threading.Barrier(len(workers))
            leases: dict[str, Lease | None] = {}

            def take(store: Store, owner: str) -> None:
                barrier.wait()
                leases[owner] = store.lease(owner, 60)

            threads = [
                threading.Thread(target=take, args=(store, f"worker-{index}")) for index, store in enumerate(workers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            winners = [owner for owner, lease in leases.items() if lease is not None]
            assert len(winners) == 1, f"round {round_number}: {leases}"
            assert leases[winners[0]].job["id"] == job["id"]
            stored = workers[0].job(PROJECT, job["id"])
            assert stored["lease_owner"] == winners[0] and stored["attempts"] == 1
    finally:
        for store in workers:
            store.close()


def test_cancel_stops_a_queued_job_at_once_and_flags_a_running_one(store, clock):
    queued = add_job(store)
    cancelled = store.request_cancel(PROJECT, queued["id"])
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"]
    assert cancelled["finished_at"] == int(clock.now)
    assert store.lease("worker-1", 30) is None

    running = add_job(store)
    lease = store.lease("worker-1", 30)
    flagged = store.request_cancel(PROJECT, running["id"])
    assert flagged["status"] == "running" and flagged["cancel_requested"] and flagged["finished_at"] is None
    assert store.renew(lease, 30)["cancel_requested"]  # how the worker learns of it
    assert store.finish(lease, "cancelled")

    finished = store.request_cancel(PROJECT, running["id"])
    assert finished["status"] == "cancelled"


def test_a_finished_job_ignores_cancel(store):
    add_job(store)
    lease = store.lease("worker-1", 30)
    store.finish(lease, "succeeded")
    after = store.request_cancel(PROJECT, lease.job["id"])
    assert after["status"] == "succeeded" and not after["cancel_requested"]


def test_an_event_with_a_key_is_stored_once(store):
    job = add_job(store)
    assert store.add_event(job["id"], "Step 12: training loss=1.0", type="metrics", data={"step": 12}, key="train-12")
    assert not store.add_event(
        job["id"], "Step 12: training loss=1.0", type="metrics", data={"step": 12}, key="train-12"
    )  # a resumed worker re-reads the run's metrics
    assert store.add_event(job["id"], "Job started")
    assert store.add_event(job["id"], "Job started")  # no key: every call is an event

    events = store.events(job["id"], newest_first=False)
    assert [event["seq"] for event in events] == [1, 2, 3]
    assert [event["key"] for event in events] == ["train-12", None, None]
    assert events[0]["data"] == {"step": 12} and events[0]["type"] == "metrics"


def test_events_page_by_the_last_seen_id(store):
    job, other = add_job(store), add_job(store)
    for number in range(1, 6):
        store.add_event(job["id"], f"event {number}")
    store.add_event(other["id"], "another job's event")

    pages, after = [], None
    while page := store.events(job["id"], after=after, limit=2):
        pages.append([event["message"] for event in page])
        after = page[-1]["id"]
    assert pages == [["event 5", "event 4"], ["event 3", "event 2"], ["event 1"]]

    first = store.events(job["id"], limit=2, newest_first=False)
    assert [event["seq"] for event in first] == [1, 2]
    rest = store.events(job["id"], after=first[-1]["id"], limit=10, newest_first=False)
    assert [event["seq"] for event in rest] == [3, 4, 5]


def test_checkpoints_are_stored_once_per_step_and_page_newest_first(store):
    job = add_job(store)
    for step in (10, 20, 30):
        store.add_checkpoint(job["id"], step, {"step": step, "train_loss": 1.0 / step})
    store.add_checkpoint(job["id"], 20, {"step": 20, "train_loss": 99.0})  # a resumed run reports it again

    first = store.checkpoints(job["id"], limit=2)
    assert [row["step"] for row in first] == [30, 20]
    assert first[1]["metrics"] == {"step": 20, "train_loss": 0.05}
    rest = store.checkpoints(job["id"], after=first[-1]["id"], limit=2)
    assert [row["step"] for row in rest] == [10]
    assert store.checkpoints(job["id"], after=rest[-1]["id"]) == []


def test_jobs_page_newest_first(store, clock):
    created = []
    for number in range(5):
        created.append(add_job(store)["id"])
        if number != 2:  # jobs 2 and 3 share a second: the id breaks the tie
            clock.advance(1)
    add_job(store, project=OTHER)

    pages, after = [], None
    while page := store.jobs(PROJECT, after=after, limit=2):
        pages.append([job["id"] for job in page])
        after = page[-1]["id"]
    seen = [job_id for page in pages for job_id in page]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sorted(seen) == sorted(created)  # every job once
    assert seen[0] == created[4] and seen[-1] == created[0]
    assert set(seen[1:3]) == {created[2], created[3]} and seen[1] > seen[2]


def test_keys_are_added_listed_and_revoked_once(store, clock):
    store.add_key("key-a1", PROJECT, "admin", "hash-a1", name="ci")
    clock.advance(1)
    store.add_key("key-a2", PROJECT, "read", "hash-a2")
    store.add_key("key-n1", "proj-new", "train", "hash-n1")  # its project is created on the way

    assert [key["id"] for key in store.keys(PROJECT)] == ["key-a1", "key-a2"]
    assert [key["id"] for key in store.keys("proj-new")] == ["key-n1"]
    assert {key["id"] for key in store.keys()} == {"key-a1", "key-a2", "key-n1"}
    key = store.key("key-a1")
    assert (key["project_id"], key["scope"], key["hash"], key["name"], key["revoked_at"]) == (
        PROJECT,
        "admin",
        "hash-a1",
        "ci",
        None,
    )

    assert store.revoke_key("key-a1")
    assert store.key("key-a1")["revoked_at"] == int(clock.now)
    assert not store.revoke_key("key-a1")
    assert not store.revoke_key("key-missing")
    assert store.key("key-a2")["revoked_at"] is None


def test_lineage_from_a_file_to_jobs_and_models(store, clock):
    file, unrelated = add_file(store), add_file(store)
    trained = add_job(store, training_file=file["id"])
    clock.advance(1)
    validated = add_job(store, training_file=unrelated["id"], validation_file=file["id"])
    add_job(store, training_file=unrelated["id"])
    store.add_model(PROJECT, f"ft:tiny::{trained['id']}", trained["id"], "tiny")
    store.add_model(PROJECT, "ft:tiny::elsewhere", "ftjob-elsewhere", "tiny")

    using = store.jobs_using_file(PROJECT, file["id"])
    assert [job["id"] for job in using] == [trained["id"], validated["id"]]
    assert [model["id"] for model in store.models_of_jobs([job["id"] for job in using])] == [
        f"ft:tiny::{trained['id']}"
    ]
    assert store.models_of_jobs([]) == []
