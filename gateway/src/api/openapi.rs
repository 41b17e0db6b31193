//! The OpenAPI document, generated from the handlers' annotations and
//! refined ([`document`]) so that it says exactly what the server accepts.

use std::sync::Arc;

use axum::Extension;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{
    admin, asyncapi, cluster, commands, devices, events, health, jobs, schemas, shadow, tokens,
};
use crate::config::Config;

/// The API description; `/openapi.json` serves it.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Entente gateway API",
        description = "Register IoT devices, send them commands and set their desired state. \
Every write is agreed by the gateway group (Raft) before it is answered and returns the log index \
it committed at in `Entente-Index`. Reads are linearizable unless `?consistency=local`; \
`Entente-Min-Index: N` makes a read wait until this gateway applied index N (at most the write \
timeout, then 503 — or 412 on the leader if the group never issued N; an N more than 1000 entries \
beyond the group's commit index is 412 at once). \
Every wait is bounded: reads answer within twice the write timeout, writes within twice the write \
timeout plus 1 s, `?wait=` adds at most the wait asked for; \
a retryable failure is always a 503 problem with `Retry-After`. \
Errors are `application/problem+json` (RFC 9457). Every request except the health checks and \
this document needs `Authorization: Bearer <token>`: `viewer` tokens read, `operator` tokens also \
manage devices, commands, jobs and shadows, `admin` tokens may do everything (including managing \
tokens with `/v1/tokens` and the cluster). Every event names who made the change (`by`)."
    ),
    paths(
        devices::create_device,
        devices::create_devices,
        devices::list_devices,
        devices::get_device,
        devices::update_device,
        devices::delete_device,
        devices::rotate_secret,
        shadow::get_shadow,
        shadow::patch_shadow,
        commands::issue_command,
        commands::list_commands,
        commands::list_all_commands,
        commands::get_command,
        commands::cancel_command,
        jobs::create_job,
        jobs::list_jobs,
        jobs::get_job,
        jobs::list_executions,
        jobs::cancel_job,
        events::events,
        cluster::cluster,
        cluster::add_member,
        cluster::remove_member,
        cluster::transfer_leader,
        admin::backup,
        tokens::create_token,
        tokens::list_tokens,
        tokens::revoke_token,
        tokens::rotate_token,
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
        asyncapi::asyncapi_json,
    ),
    components(schemas(super::error::Problem, crate::ops::Event, crate::ops::Role)),
    modifiers(&BearerAuth, &ValidationSchemas),
    security(("bearer" = [])),
    tags(
        (name = "devices", description = "The device registry"),
        (name = "shadow", description = "Desired and reported device state"),
        (name = "commands", description = "Commands to devices"),
        (name = "jobs", description = "Commands rolled out over many devices"),
        (name = "events", description = "The stream of committed changes"),
        (name = "cluster", description = "The gateway group"),
        (name = "admin", description = "Backups of the replicated state"),
        (name = "tokens", description = "API tokens: create, list, revoke, rotate (admin only)"),
        (name = "health", description = "Liveness, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Adds the bearer-token security scheme.
#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token. The first admin token is written to \
                         <data-dir>/admin-token when a group starts.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Adds the schemas of [`schemas`] (ids, labels, addresses, JSON values).
#[derive(Debug)]
struct ValidationSchemas;

impl Modify for ValidationSchemas {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.schemas.extend(schemas::all());
    }
}

/// The document `/openapi.json` serves, built once per router.
#[derive(Debug, Clone)]
pub(crate) struct Document(Arc<str>);

/// The document as JSON for a gateway with `config`: the annotations'
/// document, refined where the generator cannot say what the server does:
///
/// - the schemas of `schemas::raw` as written (the generator's types would
///   drop keywords of them);
/// - unsigned integers (`u64`, `u32`) are `uint64`/`uint32` with their
///   largest value as `maximum` (the generator writes `int64` with
///   `minimum: 0`, which would bound them at 2^63 − 1);
/// - an optional parameter is absent or a value, never `null` (the
///   generator makes `Option<T>` nullable);
/// - `limit` and `wait` are bounded by this gateway's settings.
pub(crate) fn document(config: &Config) -> Document {
    let json = serde_json::to_value(ApiDoc::openapi())
        .map(|mut doc| {
            refine(&mut doc, config);
            openapi_first(doc)
        })
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "serialising the OpenAPI document");
            String::from("{}")
        });
    Document(json.into())
}

/// The document as text with `openapi` (the version) as its first member,
/// where readers (and people) look for it; the other members follow in
/// name order.
fn openapi_first(doc: Value) -> String {
    let Value::Object(mut members) = doc else {
        return doc.to_string();
    };
    let Some(version) = members.remove("openapi") else {
        return Value::Object(members).to_string();
    };
    let rest = Value::Object(members).to_string();
    let mut out = format!("{{\"openapi\":{version}");
    if rest.len() > 2 {
        out.push(',');
        out.push_str(&rest[1..]);
    } else {
        out.push('}');
    }
    out
}

fn refine(doc: &mut Value, config: &Config) {
    if let Some(components) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (name, schema) in schemas::raw() {
            components.insert(name.into(), schema);
        }
    }
    // A device registered to log in by certificate only needs one.
    if let Some(new_device) = doc
        .pointer_mut("/components/schemas/NewDevice")
        .and_then(Value::as_object_mut)
    {
        new_device.insert(
            "if".into(),
            serde_json::json!({"properties": {"auth": {"const": "certificate"}}, "required": ["auth"]}),
        );
        new_device.insert(
            "then".into(),
            serde_json::json!({"required": ["cert_sha256"], "properties": {"cert_sha256": {"type": "string"}}}),
        );
    }
    unsigned(doc);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    device_named_batch(paths);
    for operation in paths.values_mut().filter_map(Value::as_object_mut) {
        for op in operation.values_mut() {
            let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                continue;
            };
            for p in params.iter_mut() {
                let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
                let bound = match name {
                    "limit" => Some((1, u64::from(config.max_page))),
                    "wait" => Some((
                        0,
                        u64::try_from(config.max_wait.as_millis()).unwrap_or(u64::MAX),
                    )),
                    _ => None,
                };
                let Some(schema) = p.get_mut("schema") else {
                    continue;
                };
                not_null(schema);
                if let (Some((min, max)), Some(s)) = (bound, schema.as_object_mut()) {
                    s.insert("minimum".into(), min.into());
                    s.insert("maximum".into(), max.into());
                }
            }
        }
    }
}

/// `GET`, `PATCH` and `DELETE /v1/devices/batch` are `/v1/devices/{id}`
/// of the device whose id is `batch` (a concrete path wins over a template,
/// so the document must say so): those operations, without the `id`
/// parameter.
fn device_named_batch(paths: &mut serde_json::Map<String, Value>) {
    let Some(device) = paths.get("/v1/devices/{id}").cloned() else {
        return;
    };
    let Some(batch) = paths
        .get_mut(super::devices::BATCH_PATH)
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for method in ["get", "patch", "delete"] {
        let Some(mut op) = device.get(method).cloned() else {
            continue;
        };
        if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
            params.retain(|p| !(p["in"] == "path" && p["name"] == "id"));
        }
        if let Some(o) = op.as_object_mut() {
            let id = o
                .get("operationId")
                .and_then(Value::as_str)
                .unwrap_or(method);
            let id = format!("{id}_named_batch");
            o.insert("operationId".into(), id.into());
            let about = o.get("description").and_then(Value::as_str).unwrap_or("");
            let about = format!(
                "`/v1/devices/{{id}}` of the device whose id is `batch` (this path is also \
                 the batch registration's, with POST). {about}"
            );
            o.insert("description".into(), about.into());
        }
        batch.insert(method.into(), op);
    }
}

/// Rewrites every unsigned integer schema (`int64`/`int32` with `minimum: 0`).
fn unsigned(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let zero_min = m.get("minimum").and_then(Value::as_f64) == Some(0.0);
            let format = m.get("format").and_then(Value::as_str);
            let widened = match format {
                Some("int64") if zero_min => Some(("uint64", Value::from(u64::MAX))),
                Some("int32") if zero_min => Some(("uint32", Value::from(u32::MAX))),
                _ => None,
            };
            if let Some((format, max)) = widened {
                m.insert("format".into(), format.into());
                m.entry("maximum").or_insert(max);
            }
            m.values_mut().for_each(unsigned);
        }
        Value::Array(a) => a.iter_mut().for_each(unsigned),
        _ => {}
    }
}

/// Drops `null` from a parameter's schema: `type: [T, "null"]` becomes
/// `type: T`, and `oneOf: [{type: null}, S]` becomes `S`.
fn not_null(schema: &mut Value) {
    let Some(m) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Array(types)) = m.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let t = types.remove(0);
            m.insert("type".into(), t);
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(Value::Array(alts)) = m.get_mut(key) {
            alts.retain(|a| a.get("type").and_then(Value::as_str) != Some("null"));
            if alts.len() == 1 {
                let only = alts.remove(0);
                m.remove(key);
                if let Value::Object(o) = only {
                    for (k, v) in o {
                        m.entry(k).or_insert(v);
                    }
                }
            }
        }
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "health", security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json(Extension(doc): Extension<Document>) -> Response {
    let mut res = (StatusCode::OK, doc.0.to_string()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
