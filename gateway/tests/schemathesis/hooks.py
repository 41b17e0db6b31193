# Schemathesis hooks of the property-based API test (gateway/tests/schemathesis.rs).
#
# The test drives one real gateway, a single-member group. Three kinds of
# request that the document rightly allows are kept from harming it or the
# machine, right before they are sent (every phase: examples, coverage,
# fuzzing, stateful):
#
# - `"force": true` on POST /v1/cluster/members becomes `false`: a forced
#   promotion of a learner that does not exist (every learner the test adds
#   is one) makes a second voter that never answers, and the group can never
#   commit again. Without `force` the leader refuses it (409), which the run
#   does test.
# - a well-formed peer `address` becomes 127.0.0.1:9 (the discard port,
#   closed here): the leader dials the members it is given, and a generated
#   host name or address must not be looked up or dialled.
# - `?wait=` (how long a command request may wait for the command to end;
#   the test's commands never end, as no device is connected) is capped at
#   WAIT_CAP_MS when it is within the document's bounds, so that a run is not
#   mostly waiting. Values outside the bounds are sent as generated.
#
# And one that only the stateful phase trips over: a node id generated as a
# number with an integral value (`4.0`, an integer to JSON Schema, which the
# gateway takes in a body) is sent as `4`, because the phase carries it from
# the body of POST /v1/cluster/members into the path of
# DELETE /v1/cluster/members/{id}, where it would be written `4.0`.
#
# The run's own token is kept: a request revoking or rotating the token
# the run authenticates with (ENTENTE_PROTECT_TOKEN, its id) names an id no
# token has instead (404), or every later request would be refused.
#
# The check `role_is_respected` (authorization, property-tested): with
# ENTENTE_ROLE set to the role of the run's token (`viewer`, `operator`,
# `admin`) or to `revoked` / `expired`, and ENTENTE_ROUTE_ROLES the
# gateway's route table (`METHOD /path` -> the least role, null for public
# routes), every response to an operation the token may not use must be a
# refusal: 403 (or 401) for a role below the route's, and 401 for a revoked
# or expired token on every route that needs a token. A 2xx, or anything
# else, fails the run.
import json
import os
import re

import schemathesis

WAIT_CAP_MS = 200
LOOPBACK_PEER = "127.0.0.1:9"
NO_SUCH_TOKEN = "tok-0000000000000000"
ROLE = os.environ.get("ENTENTE_ROLE")
ROUTE_ROLES = json.loads(os.environ.get("ENTENTE_ROUTE_ROLES", "{}"))
PROTECT = os.environ.get("ENTENTE_PROTECT_TOKEN")
RANK = {"viewer": 0, "operator": 1, "admin": 2}


@schemathesis.check
def role_is_respected(ctx, response, case):
    if ROLE is None:
        return None
    # The method sent (the coverage phase also tries methods the document
    # does not list for the path).
    label = f"{response.request.method.upper()} {case.operation.path}"
    if label not in ROUTE_ROLES:
        # A method the document does not list for the path (the coverage
        # phase tries some): 405, checked by the main run.
        return None
    needed = ROUTE_ROLES[label]
    status = response.status_code
    if needed is None:
        return None
    if ROLE in ("revoked", "expired"):
        if status != 401:
            raise AssertionError(
                f"{label} answered {status} to a {ROLE} token; only 401 is right"
            )
    elif RANK[ROLE] < RANK[needed] and status not in (401, 403):
        raise AssertionError(
            f"{label} needs the {needed} role and answered {status} to a {ROLE} token"
        )
    return None


def _component(case, name):
    return case.operation.schema.raw_schema["components"]["schemas"][name]


def _parameter(case, name):
    raw = case.operation.schema.raw_schema
    operation = raw["paths"][case.operation.path][case.operation.method.lower()]
    for p in operation.get("parameters", []):
        if p.get("name") == name:
            return p.get("schema", {})
    return {}


@schemathesis.hook
def before_call(context, case, kwargs):
    method = case.operation.method.upper()
    path = case.operation.path
    if (
        PROTECT
        and path in ("/v1/tokens/{id}", "/v1/tokens/{id}/rotate")
        and isinstance(case.path_parameters, dict)
        and case.path_parameters.get("id") == PROTECT
    ):
        case.path_parameters["id"] = NO_SUCH_TOKEN
    if method == "POST" and path == "/v1/cluster/members" and isinstance(case.body, dict):
        node = case.body.get("id")
        if isinstance(node, float) and node.is_integer() and 0 <= node < 2**64:
            case.body["id"] = int(node)
        if case.body.get("force") is True:
            case.body["force"] = False
        address = case.body.get("address")
        pattern = _component(case, "PeerAddress")["pattern"]
        if isinstance(address, str) and re.search(pattern, address):
            case.body["address"] = LOOPBACK_PEER
    if isinstance(case.query, dict) and "wait" in case.query:
        wait = case.query["wait"]
        bounds = _parameter(case, "wait")
        # The coverage phase may send a number as its text.
        if isinstance(wait, str) and wait.isascii() and wait.isdigit():
            wait = int(wait)
        if (
            isinstance(wait, int)
            and not isinstance(wait, bool)
            and bounds.get("minimum", 0) <= wait <= bounds.get("maximum", 0)
        ):
            case.query["wait"] = min(wait, WAIT_CAP_MS)
