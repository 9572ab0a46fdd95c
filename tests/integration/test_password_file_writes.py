"""Enrollments on a password-auth broker share the password file's writes (group commit):
every caller returns only once a write that read the database after its commit is done, so
its device is in the file; callers that arrive while a write is under way share the next one.
On SQLite and PostgreSQL, with a reload command that takes a while, as a real one does."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

from sqlmodel import Session

from fleet_server.auth.broker_files import BrokerFiles, GroupedWrites
from fleet_server.auth.ca import FleetCA
from fleet_server.auth.mqtt_passwords import mosquitto_hash
from fleet_server.database import make_engine
from fleet_server.devices.tables import Device
from fleet_server.schema import upgrade

CALLERS = 24


def test_every_enrollment_is_in_the_file_when_it_returns_and_writes_are_shared(
    db_url: str, tmp_path: Path
) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    ca = FleetCA.load_or_create(tmp_path / "ca")
    password_file = tmp_path / "passwords"
    reloads = tmp_path / "reloads"
    writes = GroupedWrites(
        engine,
        ca,
        BrokerFiles(
            password_file=password_file,
            # A reload that takes 50 ms (a broker rereading a big file): the callers pile up.
            reload_command=f"sh -c 'sleep 0.05; echo x >> {reloads}'",
        ),
    )
    start = threading.Barrier(CALLERS)
    missing: list[str] = []
    failures: list[BaseException] = []

    def enroll(i: int) -> None:
        device = f"pw-{i:02d}"
        try:
            start.wait()
            with Session(engine) as session:
                session.add(
                    Device(
                        id=device,
                        profile="x86-64-avx2",
                        labels={},
                        enrolled_at=datetime.now(UTC),
                        secret_hash=f"{i:064x}",
                        mqtt_password_hash=mosquitto_hash(f"secret-{i}"),
                    )
                )
                session.commit()
            _, reload_error = writes.write()
            assert reload_error is None, reload_error
            lines = password_file.read_text().splitlines()
            if not any(line.startswith(f"{device}:") for line in lines):
                missing.append(device)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.dispose()
    assert not failures, failures
    assert missing == []  # each caller's device was in the file when it returned
    text = password_file.read_text()
    assert sorted(line.split(":")[0] for line in text.splitlines()) == [
        f"pw-{i:02d}" for i in range(CALLERS)
    ]
    # Shared: far fewer writes (and broker reloads) than enrollments, every caller covered.
    assert writes.covered == CALLERS
    assert writes.writes <= CALLERS // 3, writes.writes
    # Every write that changed the file reloaded the broker, once; a later write that found
    # the file current (an earlier one had read its callers' commits too) did not.
    assert 1 <= writes.changed <= writes.writes
    assert len(reloads.read_text().splitlines()) == writes.changed
