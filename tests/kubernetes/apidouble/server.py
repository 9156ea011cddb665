"""The double's HTTP API: discovery, bearer-token auth, RBAC deny rules, and core/v1
CRUD, list and watch for the resources in ``store.RESOURCES``, plus pods/log, pods/exec
and pods/portforward (see ``streams``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import logging
import random
import uuid
from typing import Any

import yaml
from aiohttp import web

from . import admission, meta, streams
from .cluster import ApiRequest, Cluster
from .meta import JSON, ApiError, bad_request, not_found, rfc3339, unknown_route
from .patch import apply_patch
from .store import RESOURCES, Change, Resource

log = logging.getLogger(__name__)
_SERVER_FIELDS = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
    "generation",
)
_CONNECT = {"exec", "portforward", "attach"}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def respond(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)


def query_bool(value: str | None) -> bool:
    """The apiserver's bool query parsing: absent, '', '0' and 'false' are false."""
    return value is not None and value.lower() not in ("", "0", "false")


def strip_type(obj: JSON) -> JSON:
    """List items carry no kind/apiVersion in the apiserver's JSON."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


class Api:
    """The aiohttp application of one double."""

    def __init__(self, cluster: Cluster, token: str) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.token = token
        self.server_address = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.headers.get("Authorization", "") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            return await self._route(request)
        except ApiError as err:
            log.debug(
                "k8s double: %s %s -> %d %s", request.method, request.path_qs, err.code, err.message
            )
            return respond(err.status(), err.code)
        except (asyncio.CancelledError, ConnectionResetError, web.HTTPException):
            raise
        except Exception as exc:
            log.exception("k8s double: %s %s failed", request.method, request.path)
            err = ApiError(
                500,
                "InternalError",
                f"Internal error occurred: {exc}",
                {"causes": [{"message": str(exc)}]},
            )
            return respond(err.status(), 500)

    def _log(self, info: tuple[str, str, str | None, str | None], code: int) -> None:
        self.cluster.requests.append(ApiRequest(*info, code))

    # -- routing ---------------------------------------------------------------------------
    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.method == "GET":
            if parts == ["version"]:
                return respond(admission.VERSION)
            if parts == ["api"]:
                return respond(
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": self.server_address}
                        ],
                    }
                )
            if parts == ["api", "v1"]:
                return respond(admission.discovery())
            if parts == ["apis"]:
                return respond({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
            if parts and parts[0] in ("healthz", "livez", "readyz"):
                return web.Response(text="ok")
        if len(parts) < 3 or parts[:2] != ["api", "v1"]:
            raise unknown_route()
        rest = parts[2:]
        ns: str | None = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            ns, rest = rest[1], rest[2:]
        if len(rest) > 3 or rest[0] not in RESOURCES:
            raise unknown_route()
        res = RESOURCES[rest[0]]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if (res.namespaced and ns is None and name is not None) or (
            not res.namespaced and ns is not None
        ):
            raise unknown_route()
        verb = self._verb(request, name, sub)
        resource = f"{res.name}/{sub}" if sub else res.name
        info = (verb, resource, ns, name)
        try:
            if sub in _CONNECT and request.method == "GET":
                self.cluster.authorize("get", resource, ns, name)
            self.cluster.authorize(verb, resource, ns, name)
            response = await self._serve(request, res, verb, ns, name, sub)
        except ApiError as err:
            self._log(info, err.code)
            raise
        except web.HTTPException as exc:
            self._log(info, exc.status)
            raise
        self._log(info, response.status)
        return response

    @staticmethod
    def _verb(request: web.Request, name: str | None, sub: str | None) -> str:
        method = request.method
        if sub in _CONNECT:
            return "create"
        if method == "GET":
            if name:
                return "get"
            return "watch" if query_bool(request.query.get("watch")) else "list"
        if method == "DELETE":
            return "delete" if name else "deletecollection"
        verbs = {"POST": "create", "PUT": "update", "PATCH": "patch"}
        if method not in verbs:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        return verbs[method]

    async def _serve(
        self,
        request: web.Request,
        res: Resource,
        verb: str,
        ns: str | None,
        name: str | None,
        sub: str | None,
    ) -> web.StreamResponse:
        if verb not in res.verbs and not sub:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        if sub:
            if res.name == "pods" and sub == "log" and request.method == "GET":
                return await streams.logs(self.cluster, request, ns or "", name or "")
            if res.name == "pods" and sub == "exec" and request.method in ("GET", "POST"):
                return await streams.exec_handler(self.cluster, request, ns or "", name or "")
            if res.name == "pods" and sub == "portforward" and request.method in ("GET", "POST"):
                return await streams.portforward_handler(
                    self.cluster, request, ns or "", name or ""
                )
            if sub == "status" and request.method == "GET" and name:
                return respond(self._get(res, ns or "", name))
            raise unknown_route()
        if verb in ("list", "watch"):
            return await self._list(request, res, ns, verb == "watch")
        assert ns is not None or not res.namespaced
        key_ns = ns or ""
        if verb == "get":
            return respond(self._get(res, key_ns, name or ""))
        if verb == "create":
            if res.namespaced and ns is None:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            return await self._create(request, res, key_ns)
        if verb in ("update", "patch"):
            return await self._update(request, res, key_ns, name or "", verb)
        if verb == "delete":
            return await self._delete(request, res, key_ns, name or "")
        return await self._delete_collection(request, res, ns)

    # -- reads -----------------------------------------------------------------------------
    def _get(self, res: Resource, ns: str, name: str) -> JSON:
        obj = self.store.get(res.name, ns, name)
        if obj is None:
            raise not_found(res.name, name)
        return obj

    def _predicate(self, request: web.Request, res: Resource) -> Any:
        labels = meta.parse_label_selector(request.query.get("labelSelector"))
        fields = meta.parse_field_selector(request.query.get("fieldSelector"), res.fields)
        return lambda obj: labels(obj) and fields(obj)

    async def _list(
        self, request: web.Request, res: Resource, ns: str | None, watch: bool
    ) -> web.StreamResponse:
        match = self._predicate(request, res)
        if watch:
            return await self._watch(request, res, ns, match)
        items = [o for o in self.store.list(res.name, ns) if match(o)]
        md: JSON = {"resourceVersion": str(self.store.rv)}
        token = request.query.get("continue")
        if token:
            try:
                start = json.loads(base64.urlsafe_b64decode(token.encode()))["start"]
            except (ValueError, KeyError, binascii.Error) as exc:
                raise bad_request(f"continue key is not valid: {exc}") from exc
            items = [o for o in items if _sort_key(o) > tuple(start)]
        limit = int(request.query.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            md["remainingItemCount"] = len(items) - limit
            items = items[:limit]
            md["continue"] = base64.urlsafe_b64encode(
                json.dumps({"start": list(_sort_key(items[-1]))}).encode()
            ).decode()
        return respond(
            {
                "kind": f"{res.kind}List",
                "apiVersion": "v1",
                "metadata": md,
                "items": [strip_type(o) for o in items],
            }
        )

    async def _watch(
        self, request: web.Request, res: Resource, ns: str | None, match: Any
    ) -> web.StreamResponse:
        query = request.query
        rv = query.get("resourceVersion") or ""
        initial = query_bool(query.get("sendInitialEvents"))
        since = None if rv in ("", "0") or initial else _int_rv(rv)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            backlog, sub = self.store.subscribe(res.name, ns, since)
        except ApiError as err:
            await response.prepare(request)
            await response.write((dumps({"type": "ERROR", "object": err.status()}) + "\n").encode())
            await response.write_eof()
            return response
        timeout = float(query.get("timeoutSeconds") or random.uniform(1800, 3600))
        try:
            await response.prepare(request)
            if since is None:
                for obj in self.store.list(res.name, ns):
                    if match(obj):
                        await _send(response, "ADDED", obj)
                if initial:
                    mark = {
                        "kind": res.kind,
                        "apiVersion": "v1",
                        "metadata": {
                            "resourceVersion": str(self.store.rv),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    }
                    await _send(response, "BOOKMARK", mark)
            for change in backlog:
                await _send_change(response, change, match)
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    change = await asyncio.wait_for(sub.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if change is None:
                    break
                await _send_change(response, change, match)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unsubscribe(sub)
        return response

    # -- writes ------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            raise bad_request("the body of the request is empty")
        try:
            if "yaml" in request.content_type:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc

    def _check_namespace(self, ns: str, resource: str, name: str) -> None:
        ns_obj = self.store.get("namespaces", "", ns)
        if ns_obj is None:
            raise not_found("namespaces", ns)
        if ns_obj["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{resource} "{name}" is forbidden: unable to create new content in '
                f"namespace {ns} because it is being terminated",
                {
                    "name": name,
                    "kind": resource,
                    "causes": [
                        {
                            "reason": "NamespaceTerminating",
                            "message": f"namespace {ns} is being terminated",
                            "field": "metadata.namespace",
                        }
                    ],
                },
            )

    async def _create(self, request: web.Request, res: Resource, ns: str) -> web.StreamResponse:
        obj = await self._body(request)
        if not isinstance(obj, dict):
            raise bad_request("the body of the request must be a JSON object")
        if obj.get("kind") not in (None, res.kind):
            raise bad_request(f"the server could not handle {obj.get('kind')!r} as a {res.kind}")
        obj["kind"], obj["apiVersion"] = res.kind, "v1"
        md = obj.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise bad_request("metadata must be an object")
        for key in _SERVER_FIELDS:
            md.pop(key, None)
        if res.namespaced:
            if md.get("namespace") not in (None, "", ns):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request"
                )
            md["namespace"] = ns
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + "".join(
                random.choices("bcdfghjklmnpqrstvwxz2456789", k=5)
            )
        name = md.get("name") or ""
        if res.namespaced:
            self._check_namespace(ns, res.name, name)
        causes = admission.validate_meta(res, md)
        causes += admission.admit(res, obj, None)
        if causes:
            raise meta.invalid(res.kind, name, causes)
        if "All" in request.query.getall("dryRun", []):
            md["uid"], md["creationTimestamp"] = str(uuid.uuid4()), rfc3339()
            return respond(obj, 201)
        if self.store.get(res.name, ns, name) is not None:
            raise meta.already_exists(res.name, name)
        created = self.store.create(res.name, obj)
        if res.name == "pods":
            self.cluster.pod_created(created)
        return respond(created, 201)

    async def _update(
        self, request: web.Request, res: Resource, ns: str, name: str, verb: str
    ) -> web.StreamResponse:
        current = self._get(res, ns, name)
        body = await self._body(request)
        if verb == "patch":
            new = apply_patch(request.headers.get("Content-Type", ""), current, body)
        else:
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be a JSON object")
            new = copy.deepcopy(body)
        md = new.setdefault("metadata", {})
        if md.get("name", name) != name:
            raise bad_request(
                f"the name of the object ({md.get('name')}) does not match the name "
                f"on the URL ({name})"
            )
        wanted_rv = md.get("resourceVersion")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise meta.conflict(
                res.name,
                name,
                "the object has been modified; please apply your changes to the latest "
                "version and try again",
            )
        new["kind"], new["apiVersion"] = res.kind, "v1"
        for key in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if key in current["metadata"]:
                md[key] = current["metadata"][key]
            else:
                md.pop(key, None)
        md["resourceVersion"] = current["metadata"]["resourceVersion"]
        causes = admission.validate_meta(res, md) + admission.admit(res, new, current)
        if causes:
            raise meta.invalid(res.kind, name, causes)
        if "All" in request.query.getall("dryRun", []) or new == current:
            return respond(current if new == current else new)
        updated = self.store.update(res.name, new)
        self.cluster.finalize(res.name, ns, name)
        return respond(updated)

    async def _delete(
        self, request: web.Request, res: Resource, ns: str, name: str
    ) -> web.StreamResponse:
        options: JSON = {}
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    options = json.loads(raw)
                except ValueError as exc:
                    raise bad_request(f"invalid DeleteOptions: {exc}") from exc
        query = request.query
        if "gracePeriodSeconds" in query:
            options["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "orphanDependents" in query:
            options["orphanDependents"] = query_bool(query["orphanDependents"])
        policy = options.get("propagationPolicy")
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise meta.invalid(
                "DeleteOptions",
                "",
                [
                    meta.not_supported(
                        "propagationPolicy", policy, ("Foreground", "Background", "Orphan")
                    )
                ],
            )
        dry_run = "All" in query.getall("dryRun", []) or "All" in (options.get("dryRun") or [])
        obj = await self.cluster.delete_object(res.name, ns, name, options, dry_run)
        if res.name in ("pods", "namespaces") or self.store.get(res.name, ns, name) is not None:
            return respond(obj)
        return respond(meta.success_status(res.name, name, obj["metadata"].get("uid", "")))

    async def _delete_collection(
        self, request: web.Request, res: Resource, ns: str | None
    ) -> web.StreamResponse:
        match = self._predicate(request, res)
        grace = request.query.get("gracePeriodSeconds")
        options: JSON = {"gracePeriodSeconds": int(grace)} if grace is not None else {}
        deleted = []
        for obj in [o for o in self.store.list(res.name, ns) if match(o)]:
            md = obj["metadata"]
            try:
                deleted.append(
                    strip_type(
                        await self.cluster.delete_object(
                            res.name, md.get("namespace", ""), md["name"], options
                        )
                    )
                )
            except ApiError:
                continue
        return respond(
            {
                "kind": f"{res.kind}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": deleted,
            }
        )


def _sort_key(obj: JSON) -> tuple[str, str]:
    return (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def _int_rv(value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise bad_request(
            f'resourceVersion: Invalid value: "{value}": must be a valid resource version'
        ) from exc


async def _send(response: web.StreamResponse, kind: str, obj: JSON) -> None:
    await response.write((dumps({"type": kind, "object": obj}) + "\n").encode())


async def _send_change(response: web.StreamResponse, change: Change, match: Any) -> None:
    """One watch event, translated for the selector (objects entering or leaving it)."""
    now = match(change.obj)
    before = change.prev is not None and match(change.prev)
    if change.kind == "ADDED" and now:
        await _send(response, "ADDED", change.obj)
    elif change.kind == "MODIFIED":
        if now and before:
            await _send(response, "MODIFIED", change.obj)
        elif now:
            await _send(response, "ADDED", change.obj)
        elif before:
            await _send(response, "DELETED", change.obj)
    elif change.kind == "DELETED" and (before or now):
        await _send(response, "DELETED", change.obj)
