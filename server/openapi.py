"""The HTTP API as an OpenAPI 3.1 document, generated from the app's route table (so it
cannot drift from what the server answers): every route, its methods, its path
parameters, the query parameters and body its ``guarded`` decorator declares
(:class:`server.inputs.Param`), the action the rights check needs.

Served at ``GET /api/openapi.json`` (no session needed: it describes the API, no data).
"""
from __future__ import annotations

import re

from starlette.routing import Route

#: Path parameters that are integers; every other one is a string (a UID, a name).
INT_PATH_PARAMS = {"frame": ("frame number, from 1", 1), "item": ("item id", 1)}
_UID_WORDS = {"study": "Study Instance UID", "series": "Series Instance UID",
              "sop": "SOP Instance UID", "slide": "slide UID (or number)",
              "name": "associated image name (label, macro, thumbnail)"}

ERROR_SCHEMA = {"type": "object", "required": ["error", "status"],
                "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                               "field": {"type": "string"}}}


def _path_param(name: str) -> dict:
    if name in INT_PATH_PARAMS:
        desc, lo = INT_PATH_PARAMS[name]
        schema = {"type": "integer", "minimum": lo, "maximum": (1 << 63) - 1}
    else:
        desc = _UID_WORDS.get(name, name)
        schema = {"type": "string", "minLength": 1}
    return {"name": name, "in": "path", "required": True, "description": desc,
            "schema": schema}


def _operation(route: Route, method: str) -> dict:
    ep = route.endpoint
    info = getattr(ep, "medview", None) or {}
    action = info.get("action")
    params = [_path_param(n) for n in route.param_convertors]
    for p in info.get("query", ()):
        params.append({"name": p.name, "in": "query", "required": p.required,
                       "description": p.description, "schema": p.schema()})
    doc = (ep.__doc__ or "").strip().splitlines()
    op = {
        "operationId": f"{method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', route.path).strip('_')}",
        "summary": doc[0] if doc else route.name,
        "parameters": params,
        "responses": {
            "200": {"description": "the answer"},
            "400": {"description": "a malformed input (the field is named)",
                    "content": {"application/json": {"schema": ERROR_SCHEMA}}},
            "401": {"description": "no valid session"},
            "403": {"description": "beyond the user's rights (the maximum is named)"},
            "404": {"description": "unknown, or not inside its parent"},
        },
    }
    if action is None and "public" in info:
        op["security"] = []
    if action is not None:
        op["x-medview-action"] = action
    body = info.get("body")
    if method in ("POST", "PUT") and body is not None:
        op["requestBody"] = {"required": info.get("body_required", False),
                             "content": {"application/json": {"schema": body}}}
    return op


def document(routes, version: str) -> dict:
    """The OpenAPI document of a route table."""
    paths: dict = {}
    for r in routes:
        if not isinstance(r, Route):
            continue
        item = paths.setdefault(r.path, {})
        for m in sorted((r.methods or {"GET"}) - {"HEAD"}):
            item[m.lower()] = _operation(r, m)
    return {
        "openapi": "3.1.0",
        "info": {"title": "MedView image server", "version": version,
                 "description": "Studies, series and images (DICOMweb), packet streams "
                                "(JPIP), slides, versions and diagnosis records. Every "
                                "route but log-in, health and this document needs a "
                                "session: Authorization: Bearer <session>."},
        "components": {"securitySchemes": {"session": {"type": "http", "scheme": "bearer"}}},
        "security": [{"session": []}],
        "paths": paths,
    }


def openapi_route(version: str) -> Route:
    """``GET /api/openapi.json``: the document of the app's route table as it is when
    asked (routes added to ``app.router.routes`` later are in it too)."""
    from starlette.responses import JSONResponse

    async def openapi(request):
        """The OpenAPI document of this server's HTTP API."""
        return JSONResponse(document(request.app.router.routes, version))

    openapi.medview = {"action": None, "public": True}
    return Route("/api/openapi.json", openapi)
