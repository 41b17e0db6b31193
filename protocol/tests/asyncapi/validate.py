"""Validates an AsyncAPI 3.0 document (tests/asyncapi.rs runs it).

usage: validate.py ASYNCAPI-3.0.0-SCHEMA.json DOCUMENT.json

1. The document against the official JSON Schema of AsyncAPI 3.0.0 (the
   file `schemas/3.0.0.json` of the npm package `@asyncapi/specs`, which
   .ci/run fetches pinned by version and SHA-256).
2. What the specification requires and its schema cannot say: every local
   `$ref` resolves; a channel's parameters are exactly the `{names}` of its
   address; an operation's channel is a channel of the document and its
   messages are messages of that channel; operation ids unique.
3. Every message example against the message's payload schema.

Prints one line per problem and exits 1 if there is any; prints `valid`
and exits 0 otherwise.
"""

import json
import re
import sys

from jsonschema import Draft7Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT7


def where(path):
    return "/" + "/".join(str(p) for p in path)


def short(text, limit=300):
    return text if len(text) <= limit else text[:limit] + "…"


def pointer(doc, ref):
    node = doc
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def refs(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield path, v
            else:
                yield from refs(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from refs(v, path + (i,))


def main():
    schema_path, doc_path = sys.argv[1], sys.argv[2]
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    with open(doc_path, encoding="utf-8") as f:
        doc = json.load(f)
    problems = []

    # 1. The official schema; its parts are bundled as definitions keyed by
    # their $id.
    registry = Registry().with_resources(
        (key, DRAFT7.create_resource(part)) for key, part in schema.get("definitions", {}).items()
    )
    validator = Draft7Validator(schema, registry=registry)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        # An error under oneOf/anyOf names the whole object: say which part
        # of it is wrong, as best jsonschema can tell.
        deepest = best_match([e])
        problems.append(f"{where(deepest.absolute_path)}: {short(deepest.message)}")

    # 2. The specification's rules beyond the schema.
    for path, ref in refs(doc):
        if ref.startswith("#") and pointer(doc, ref) is None:
            problems.append(f"{where(path)}: $ref {ref} does not resolve")
    channels = doc.get("channels") or {}
    for name, channel in channels.items():
        if not isinstance(channel, dict) or "$ref" in channel:
            continue
        named = set(re.findall(r"\{([^}]+)\}", channel.get("address") or ""))
        declared = set((channel.get("parameters") or {}).keys())
        if named != declared:
            problems.append(
                f"/channels/{name}: parameters {sorted(declared)} are not those of its address {sorted(named)}"
            )
    seen_ids = {}
    for name, op in (doc.get("operations") or {}).items():
        if not isinstance(op, dict):
            continue
        ref = (op.get("channel") or {}).get("$ref", "")
        if not ref.startswith("#/channels/") or pointer(doc, ref) is None:
            problems.append(f"/operations/{name}: channel {ref!r} is not a channel of the document")
            continue
        for m in op.get("messages") or []:
            mref = m.get("$ref", "") if isinstance(m, dict) else ""
            if not mref.startswith(ref + "/messages/"):
                problems.append(f"/operations/{name}: message {mref!r} is not a message of {ref}")
        op_id = op.get("operationId")
        if op_id is not None:
            if op_id in seen_ids:
                problems.append(f"/operations/{name}: operationId {op_id!r} also on {seen_ids[op_id]}")
            seen_ids[op_id] = name

    # 3. Examples against their payload schemas (refs are relative to the
    # document).
    doc_registry = Registry().with_resource("urn:document", DRAFT7.create_resource(doc))
    for name, message in ((doc.get("components") or {}).get("messages") or {}).items():
        payload = message.get("payload") if isinstance(message, dict) else None
        if payload is None:
            continue
        if isinstance(payload, dict) and isinstance(payload.get("$ref"), str) and payload["$ref"].startswith("#"):
            payload = {"$ref": "urn:document" + payload["$ref"]}
        check = Draft7Validator(payload, registry=doc_registry)
        for i, example in enumerate(message.get("examples") or []):
            if "payload" not in example:
                continue
            for e in check.iter_errors(example["payload"]):
                problems.append(
                    f"/components/messages/{name}/examples/{i}/payload{where(e.absolute_path)}: {short(e.message)}"
                )

    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in {doc_path}", file=sys.stderr)
        return 1
    print("valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
