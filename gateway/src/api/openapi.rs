//! The OpenAPI document, generated from the handlers' annotations.

use std::sync::OnceLock;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, cluster, commands, devices, events, health, shadow};

/// The API description; `/openapi.json` serves it.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Entente gateway API",
        description = "Register IoT devices, send them commands and set their desired state. \
Every write is agreed by the gateway group (Raft) before it is answered and returns the log index \
it committed at in `Entente-Index`. Reads are linearizable unless `?consistency=local`; \
`Entente-Min-Index: N` makes a read wait until this gateway applied index N (at most the write \
timeout, then 503; an N more than 1000 entries beyond the group's commit index is 412 at once). \
Every wait is bounded: reads answer within twice the write timeout, writes within twice the write \
timeout plus 1 s, `?wait=` adds at most the wait asked for; \
a retryable failure is always a 503 problem with `Retry-After`. \
Errors are `application/problem+json` (RFC 9457). Every request except the health checks and \
this document needs `Authorization: Bearer <token>`: `viewer` tokens read, `operator` tokens also \
manage devices, commands and shadows, `admin` tokens may do everything."
    ),
    paths(
        devices::create_device,
        devices::list_devices,
        devices::get_device,
        devices::update_device,
        devices::delete_device,
        devices::rotate_secret,
        shadow::get_shadow,
        shadow::patch_shadow,
        commands::issue_command,
        commands::list_commands,
        commands::get_command,
        commands::cancel_command,
        events::events,
        cluster::cluster,
        cluster::add_member,
        cluster::remove_member,
        cluster::transfer_leader,
        admin::backup,
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
    ),
    components(schemas(super::error::Problem, crate::ops::Event, crate::ops::Role)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "devices", description = "The device registry"),
        (name = "shadow", description = "Desired and reported device state"),
        (name = "commands", description = "Commands to devices"),
        (name = "events", description = "The stream of committed changes"),
        (name = "cluster", description = "The gateway group"),
        (name = "admin", description = "Backups of the replicated state"),
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

/// The document as JSON, built once.
fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi().to_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "serialising the OpenAPI document");
            String::from("{}")
        })
    })
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "health", security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> Response {
    let mut res = (StatusCode::OK, document()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
