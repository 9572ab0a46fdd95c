"""The FastAPI application: wiring of settings, database, artifact store, control plane and
the domain routers."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from sqlmodel import Session

from edge_agent import __version__
from firmware_profiles import default_catalog
from fleet_server.api.deps import AppState, StateDep, Viewer
from fleet_server.api.limits import BodyLimits
from fleet_server.artifacts import open_store
from fleet_server.audit.routes import router as audit_router
from fleet_server.auth.broker_files import BrokerFiles, GroupedWrites, sync_at_start
from fleet_server.auth.ca import FleetCA
from fleet_server.auth.routes import router as auth_router
from fleet_server.auth.service import authenticate, authenticate_ui_session, bootstrap_admin
from fleet_server.builds.routes import router as builds_router
from fleet_server.builds.runner import BuildRunner
from fleet_server.bundles.routes import router as bundles_router
from fleet_server.control.plane import ControlPlane
from fleet_server.database import make_engine
from fleet_server.devices.routes import router as devices_router
from fleet_server.errors import ERROR_RESPONSES, install_error_handlers
from fleet_server.hil.routes import router as hil_router
from fleet_server.ingest import IngestSupervisor
from fleet_server.keys.service import ServerKeys
from fleet_server.registry.routes import router as models_router
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.routes import router as rollouts_router
from fleet_server.rollouts.service import backfill_bundle_grants
from fleet_server.schema import SchemaState, check_for_start
from fleet_server.settings import Settings
from fleet_server.telemetry.retention import RetentionLoop, RetentionPolicy
from fleet_server.telemetry.routes import router as telemetry_router
from fleet_server.telemetry.service import TelemetryService
from fleet_server.trust.routes import router as trust_router
from fleet_server.ui.routes import install as install_ui
from fleet_server.versions.routes import router as versions_router

log = logging.getLogger(__name__)


def create_app(settings: Settings, mqtt_url: str) -> FastAPI:
    """``mqtt_url`` is the broker the server connects to (embedded or external). With
    ``settings.resolved_ingest_processes`` above 0 the app starts that many ingest processes
    (:mod:`fleet_server.ingest`) and stores no report itself."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url)
        try:
            # Normally done before (fleet_server.server.prepare_database); here for an app
            # served some other way. A database behind its migrations is refused.
            schema = check_for_start(engine)
        except BaseException:
            engine.dispose()
            raise
        if schema.state is SchemaState.EMPTY:
            log.info("created the database schema at revision %s", schema.head)
        with Session(engine) as session:
            backfilled = backfill_bundle_grants(session)
            if backfilled:
                log.info("granted %d earlier rollout bundle(s) to their devices", backfilled)
            configured = settings.admin_token.get_secret_value() if settings.admin_token else None
            written = bootstrap_admin(session, configured, settings.admin_token_file)
        if written is not None:
            log.warning("created an admin API token in %s (keep it secret)", written)
        keys = ServerKeys(settings.keys_dir)
        if settings.env == "development":
            dev_root = keys.bootstrap_development(engine)
            if dev_root is not None:
                log.warning(
                    "development: created a fleet root key in %s and signing keys; a production "
                    "fleet keeps its root key offline (edgefleet keys init)",
                    dev_root,
                )
        store = open_store(settings)
        store.check()  # normally done before too (prepare_database), for one line at start
        ingest_processes = settings.resolved_ingest_processes
        metrics_dir = settings.data_dir / "ingest-metrics"
        if ingest_processes:
            shutil.rmtree(metrics_dir, ignore_errors=True)  # counters since this start
            metrics_dir.mkdir(parents=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # the children's
        # A policy that does not parse stops the start, naming the setting.
        policy = RetentionPolicy.parse(settings.telemetry_retention, settings.telemetry_bucket_s)
        telemetry = TelemetryService(
            engine,
            store,
            bucket_s=settings.telemetry_bucket_s,
            window_s=settings.telemetry_window_s,
            ingest_metrics_dir=metrics_dir if ingest_processes else None,
        )
        ca = FleetCA.load_or_create(settings.ca_dir)
        broker_files = BrokerFiles.from_settings(settings)
        synced = sync_at_start(engine, ca, broker_files)
        # Enrollments write the password file (only), sharing writes when many arrive at once.
        password_writes = (
            GroupedWrites(
                engine,
                ca,
                BrokerFiles(
                    password_file=broker_files.password_file,
                    reload_command=broker_files.reload_command,
                ),
            )
            if broker_files.password_file is not None
            else None
        )
        if synced:
            log.warning("rewrote the broker's %s from the database", ", ".join(map(str, synced)))
        control = ControlPlane(
            engine,
            mqtt_url,
            keys=keys,
            device_mqtt_url=settings.device_mqtt_url,
            desired_ttl_s=settings.desired_state_ttl_s,
            resend_interval_s=settings.desired_resend_interval_s,
            tls=(settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file),
            credentials=(
                (settings.mqtt_username, settings.mqtt_password.get_secret_value())
                if settings.mqtt_username and settings.mqtt_password
                else None
            ),
            status_per_s=settings.status_rate_per_s,
            status_burst=settings.status_burst,
            registry=telemetry.report_registry,
            ingest=not ingest_processes,
        )
        if settings.telemetry_ingest and not ingest_processes:
            telemetry.start_ingest(control=control)  # before the connection subscribes
        control.start()
        catalog = default_catalog()
        builds = BuildRunner(
            engine,
            store,
            keys,
            catalog,
            workers=settings.build_workers,
            timeout_s=settings.build_timeout_s,
            lease_s=settings.build_lease_s,
        )
        builds.start()
        rollouts = RolloutEngine(
            engine,
            keys=keys,
            runner=builds,
            bundles=telemetry.bundles,
            publish=control.publish_all,
            public_url=settings.resolved_public_url,
            desired_ttl_s=settings.desired_state_ttl_s,
            tick_s=settings.rollout_tick_s,
            bucket_s=settings.telemetry_bucket_s,
        )
        control.on_report = rollouts.wake
        retention = RetentionLoop(
            engine, policy, interval_s=settings.telemetry_retention_interval_s
        ).start()
        rollouts.start()
        ingest = (
            IngestSupervisor(settings, mqtt_url, ingest_processes, rollouts.wake).start()
            if ingest_processes
            else None
        )
        app.state.edgefleet = AppState(
            settings=settings,
            engine=engine,
            store=store,
            catalog=catalog,
            control=control,
            keys=keys,
            ca=ca,
            builds=builds,
            authenticate=authenticate,
            authenticate_session=authenticate_ui_session,
            telemetry=telemetry,
            rollouts=rollouts,
            password_writes=password_writes,
        )
        try:
            yield
        finally:
            if ingest is not None:
                ingest.stop()
            rollouts.stop()
            retention.stop()
            telemetry.stop()
            builds.stop()
            control.stop()
            engine.dispose()

    app = FastAPI(
        title="edgefleet",
        version=__version__,
        description="Deploy ML models to fleets of edge devices.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimits,
        upload_bytes=settings.max_upload_bytes,
        body_chunk_timeout_s=settings.body_chunk_timeout_s,
    )
    app.include_router(models_router, responses=ERROR_RESPONSES)
    app.include_router(devices_router, responses=ERROR_RESPONSES)
    app.include_router(builds_router, responses=ERROR_RESPONSES)
    app.include_router(bundles_router, responses=ERROR_RESPONSES)
    app.include_router(rollouts_router, responses=ERROR_RESPONSES)
    app.include_router(trust_router, responses=ERROR_RESPONSES)
    app.include_router(auth_router, responses=ERROR_RESPONSES)
    app.include_router(audit_router, responses=ERROR_RESPONSES)
    app.include_router(telemetry_router, responses=ERROR_RESPONSES)
    app.include_router(hil_router, responses=ERROR_RESPONSES)
    app.include_router(versions_router, responses=ERROR_RESPONSES)
    install_ui(app)

    @app.get("/healthz", tags=["health"])
    def healthz(state: StateDep) -> dict[str, Any]:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {
            "status": "ok",
            "version": __version__,
            "broker_connected": state.control.connected.is_set(),
        }

    @app.get("/v1/profiles", tags=["profiles"], responses=ERROR_RESPONSES)
    def profiles(state: StateDep, _: Viewer) -> list[dict[str, Any]]:
        return [p.to_dict() for p in state.catalog]

    return app
