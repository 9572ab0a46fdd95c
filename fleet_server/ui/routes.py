"""/ui: the operator's dashboard. Server-rendered pages (Jinja2); htmx (vendored) re-reads a
page's live part every few seconds, uPlot (vendored) draws the time series. Nothing is
loaded from another host, and every page has a plain URL.

Who may look: a signed-in browser (sign-in takes an API token and keeps an HttpOnly,
SameSite=Strict session cookie), or a script with the API token as a bearer header. Every
action is a POST that needs the operator role and, from a browser, the session's CSRF token.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlmodel import Session

from edge_agent.contracts.errors import EdgefleetError
from fleet_server.api.deps import AppState, StateDep
from fleet_server.api.limits import PRINCIPAL_STATE, SESSION_COOKIE
from fleet_server.api.principal import Principal
from fleet_server.auth.service import close_ui_session, open_ui_session
from fleet_server.devices.selectors import Selector
from fleet_server.errors import (
    AuthenticationError,
    PermissionDeniedError,
    error_response,
    http_status,
)
from fleet_server.ui import views

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)

#: Every dashboard response: nothing from another host, no framing, no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: How far back the charts and figures look unless the page says otherwise.
DEFAULT_SINCE_S = 3600.0


class SignInRequired(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


def viewer(request: Request, state: StateDep) -> Principal:
    """The caller of a page: the middleware's (requests with a body), a bearer header, or the
    session cookie. A browser without a session is sent to sign in; a script's bad token is
    refused (401)."""
    found: Principal | None = getattr(request.state, PRINCIPAL_STATE, None)
    if found is not None:
        return found
    header = request.headers.get("authorization")
    with Session(state.engine) as session:
        if header is not None:
            return state.authenticate(session, header)
        try:
            return state.authenticate_session(session, request.cookies.get(SESSION_COOKIE))
        except AuthenticationError:
            raise SignInRequired(request.url.path) from None


ViewerDep = Annotated[Principal, Depends(viewer)]


async def _csrf_checked(request: Request, principal: Principal) -> Principal:
    """From a browser, an action must send the session's CSRF token back (form field
    ``csrf`` or header ``X-CSRF-Token``); a bearer caller has no session to forge."""
    if principal.csrf is not None:
        sent = request.headers.get("x-csrf-token")
        if sent is None:
            sent = str((await request.form()).get("csrf") or "")
        if not secrets.compare_digest(sent.encode(), principal.csrf.encode()):
            raise PermissionDeniedError("the form's CSRF token is missing or wrong; reload it")
    return principal


async def operator(request: Request, principal: ViewerDep) -> Principal:
    """An action's caller: an operator (checked first: a viewer's POST is refused whatever
    it sends), with the CSRF token from a browser."""
    principal.require("operator")
    return await _csrf_checked(request, principal)


async def signed_in(request: Request, principal: ViewerDep) -> Principal:
    return await _csrf_checked(request, principal)


OperatorDep = Annotated[Principal, Depends(operator)]


def render(
    request: Request,
    template: str,
    principal: Principal | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        template,
        {"me": principal, **context},
        status_code=status_code,
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def install(app: FastAPI) -> None:
    """Mount the dashboard: its pages, its static files, and its error pages."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    @app.exception_handler(PermissionDeniedError)
    async def _refused(request: Request, exc: PermissionDeniedError) -> Response:
        """A refused action from a browser's form gets a page saying why; a script (or any
        other route) gets the API's JSON error."""
        browser = "text/html" in request.headers.get("accept", "")
        if request.url.path.startswith("/ui/") and browser:
            return render(request, "error.html", None, 403, message=exc.message)
        return error_response(request, exc)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        target = f"/ui/signin?{urlencode({'next': exc.path})}"
        if request.headers.get("hx-request") == "true":  # htmx: the whole page goes
            return Response(status_code=204, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)


def _page(
    request: Request,
    state: AppState,
    principal: Principal,
    template: str,
    build: Callable[[Session], dict[str, Any]],
) -> Response:
    """Render ``template`` with what ``build(session)`` returns; a domain error (unknown id,
    bad selector) becomes the page's error message with its status."""
    try:
        with Session(state.engine) as session:
            context = build(session)
    except EdgefleetError as e:
        status = http_status(e)
        return render(request, "error.html", principal, status, message=e.message)
    return render(request, template, principal, **context)


def _since(since_s: float | None) -> float:
    return since_s if since_s is not None else DEFAULT_SINCE_S


SinceQuery = Annotated[float | None, Query(gt=0, le=90 * 86400)]


# --- sign-in -----------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a dashboard path: never another host (``//evil``, ``https:…``)."""
    if target and target.startswith("/ui") and not target.startswith("//"):
        return target
    return "/ui"


@router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request, next: str | None = None) -> Response:
    return render(request, "signin.html", None, next=_safe_next(next), error=None)


@router.post("/signin", response_class=HTMLResponse)
def signin(
    request: Request,
    state: StateDep,
    token: Annotated[str, Form(max_length=256)],
    next: Annotated[str | None, Form(max_length=1024)] = None,
) -> Response:
    try:
        with Session(state.engine) as session:
            secret, _ = open_ui_session(session, token, state.settings.ui_session_ttl_s)
    except AuthenticationError as e:
        return render(request, "signin.html", None, 401, next=_safe_next(next), error=e.message)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=state.settings.ui_session_ttl_s,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/signout")
def signout(
    request: Request, state: StateDep, _: Annotated[Principal, Depends(signed_in)]
) -> Response:
    with Session(state.engine) as session:
        close_ui_session(session, request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


# --- pages -------------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def fleet_page(
    request: Request,
    state: StateDep,
    me: ViewerDep,
    selector: Annotated[str | None, Query(max_length=4096)] = None,
) -> Response:
    def build(session: Session) -> dict[str, Any]:
        chosen = Selector.parse(selector) if selector else None
        return {"selector": selector or "", **views.fleet(session, chosen)}

    return _page(request, state, me, "fleet.html", build)


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(request: Request, state: StateDep, me: ViewerDep, device_id: str) -> Response:
    return _page(request, state, me, "device.html", lambda s: views.device(s, device_id))


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(request: Request, state: StateDep, me: ViewerDep) -> Response:
    return _page(request, state, me, "rollouts.html", lambda s: {"rollouts": views.rollout_list(s)})


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(
    request: Request,
    state: StateDep,
    me: ViewerDep,
    rollout_id: str,
    notice: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    def build(session: Session) -> dict[str, Any]:
        found = views.rollout(session, rollout_id)
        return {"r": found, "actions": views.actions(found), "notice": notice}

    return _page(request, state, me, "rollout.html", build)


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(
    state: StateDep,
    me: OperatorDep,
    rollout_id: str,
    action: Literal["pause", "resume", "promote", "abort"],
) -> Response:
    """Pause, resume, promote or abort; back to the rollout's page with what happened."""
    steer = {
        "pause": state.rollouts.pause,
        "resume": state.rollouts.resume,
        "promote": state.rollouts.promote,
        "abort": state.rollouts.abort,
    }[action]
    try:
        steer(rollout_id, me.name)
        notice = f"{action}: done"
    except EdgefleetError as e:
        notice = f"{action} refused: {e.message}"
    return RedirectResponse(
        f"/ui/rollouts/{quote(rollout_id)}?{urlencode({'notice': notice})}", status_code=303
    )


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, state: StateDep, me: ViewerDep) -> Response:
    return _page(request, state, me, "models.html", lambda s: {"models": views.models(s)})


@router.get("/models/{name}/versions/{version}", response_class=HTMLResponse)
def version_page(
    request: Request,
    state: StateDep,
    me: ViewerDep,
    name: str,
    version: str,
    since_s: SinceQuery = None,
) -> Response:
    window = _since(since_s)

    def build(session: Session) -> dict[str, Any]:
        found = views.version(session, state.telemetry.bundles, name, version, window)
        return {**found, "since_s": window}

    return _page(request, state, me, "version.html", build)


@router.get("/models/{name}/versions/{version}/series.json")
def version_series(
    state: StateDep, _: ViewerDep, name: str, version: str, since_s: SinceQuery = None
) -> dict[str, Any]:
    with Session(state.engine) as session:
        return views.version_series(
            session, state.telemetry.bundles, name, version, _since(since_s)
        )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    state: StateDep,
    me: ViewerDep,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Response:
    def build(session: Session) -> dict[str, Any]:
        me.require("admin")  # as GET /v1/audit
        return {"events": views.audit_log(session, action, limit), "action": action or ""}

    return _page(request, state, me, "audit.html", build)
