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
import re

import schemathesis

WAIT_CAP_MS = 200
LOOPBACK_PEER = "127.0.0.1:9"


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
