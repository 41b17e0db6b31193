//! `/v1/devices/{id}/shadow`: desired and reported state.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::devices::{ReadQuery, device_not_found};
use super::error::{ApiError, Problem};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, MinIndexHeader, read_barrier, reply, unexpected, write,
};
use super::schemas::{DeviceId, IfMatch, JsonObject};
use super::validate;
use crate::ops::{Op, OpResult, Shadow};

/// Body of `PATCH /v1/devices/{id}/shadow`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"desired":{"speed":3,"mode":null}}))]
pub struct ShadowPatch {
    /// JSON merge patch (RFC 7386) of the desired state: keys set to `null`
    /// are removed, objects merge recursively.
    #[schema(value_type = JsonObject)]
    pub desired: Value,
}

fn with_etag(mut res: Response, version: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        res.headers_mut().insert(header::ETAG, v);
    }
    res
}

/// Parses `If-Match`: `5`, `"5"` or `*` (no constraint), at most 20 digits
/// (the `IfMatch` schema). Weak tags never match (RFC 9110 §13.1.1 uses
/// strong comparison), so they are refused. A version beyond 64 bits is
/// well formed but no shadow has it: it becomes `u64::MAX`, which never
/// matches either (412).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "If-Match must be the shadow version you read, as 5 or \"5\" (its ETag), or *",
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s == "*" {
        return Ok(None);
    }
    let digits = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    Ok(Some(digits.parse::<u64>().unwrap_or(u64::MAX)))
}

/// Get a device's shadow.
///
/// Desired and reported state, their delta, the desired version (also the
/// `ETag`) and per-key update times.
#[utoipa::path(
    get, path = "/v1/devices/{id}/shadow", tag = "shadow",
    params(("id" = DeviceId, Path, description = "Device id"), ReadQuery, MinIndexHeader),
    responses(
        (status = 200, description = "The shadow", body = Shadow, headers(
            ("Entente-Index" = u64, description = "Applied log index the read reflects"),
            ("ETag" = String, description = "The desired version, quoted: use it in If-Match"))),
        (status = 400, description = "Invalid id, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_shadow(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Response, ApiError> {
    validate::path_device_id(&id)?;
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    match state.db.shadow(&id).await? {
        Some(s) => Ok(with_etag(reply(StatusCode::OK, ctx.index, &s), s.version)),
        None => Err(device_not_found(&id).with_index(ctx.index)),
    }
}

/// Change a device's desired state.
///
/// A JSON merge patch of `desired`. With `If-Match: <version>` the change
/// applies only if the shadow is still at that version (412 otherwise).
/// The desired document may be at most 64 KiB as JSON and 32 levels deep: a
/// patch that would make it larger is refused (413) and changes nothing.
#[utoipa::path(
    patch, path = "/v1/devices/{id}/shadow", tag = "shadow",
    params(
        ("id" = DeviceId, Path, description = "Device id"),
        ("If-Match" = Option<IfMatch>, Header, description = "The version you read (`5` or `\"5\"`); `*` for any"),
    ),
    request_body = ShadowPatch,
    responses(
        (status = 200, description = "The shadow after the change", body = Shadow, headers(
            ("Entente-Index" = u64, description = "Log index of the write"),
            ("ETag" = String, description = "The new desired version, quoted"))),
        (status = 400, description = "Invalid id, If-Match or JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The patch conflicts with the current state", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "The shadow is not at the If-Match version", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The patch, or the desired document it would make, is over 64 KiB as JSON; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "desired is not an object, is nested over 32 levels, or has integers beyond 64 bits", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn patch_shadow(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ShadowPatch>,
) -> Result<Response, ApiError> {
    let expected_version = if_match(&headers)?;
    let op = desired_op(&id, body, expected_version)?;
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Shadow(s) => Ok(with_etag(reply(StatusCode::OK, index, &s), s.version)),
        OpResult::NotFound(_) => Err(device_not_found(&id).with_index(index)),
        OpResult::VersionMismatch { current } => Err(ApiError::version_mismatch(
            expected_version.unwrap_or_default(),
            current,
        )
        .with_index(index)),
        OpResult::Conflict(why) => Err(ApiError::conflict(format!(
            "the desired-state patch cannot be applied: {why}"
        ))
        .with_index(index)),
        OpResult::TooLarge(why) => Err(ApiError::too_large(format!(
            "the desired-state patch was not applied: {why}"
        ))
        .with_index(index)),
        r => Err(unexpected("set desired", &r, index)),
    }
}

/// Checks a desired-state patch of device `id` and builds the operation
/// `PATCH /v1/devices/{id}/shadow` proposes. Whether the merged document
/// fits is decided when the entry applies (every member alike).
pub(crate) fn desired_op(
    id: &str,
    body: ShadowPatch,
    expected_version: Option<u64>,
) -> Result<Op, ApiError> {
    validate::path_device_id(id)?;
    validate::object("desired", &body.desired)?;
    validate::json_value("desired", &body.desired)?;
    Ok(Op::SetDesired {
        device: id.to_string(),
        patch: body.desired,
        expected_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(
            header::IF_MATCH,
            HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("x")),
        );
        m
    }

    #[test]
    fn if_match_takes_bare_and_quoted_versions() {
        assert_eq!(if_match(&HeaderMap::new()).ok(), Some(None));
        assert_eq!(if_match(&h("7")).ok(), Some(Some(7)));
        assert_eq!(if_match(&h("\"7\"")).ok(), Some(Some(7)));
        assert_eq!(if_match(&h("*")).ok(), Some(None));
        assert!(if_match(&h("W/\"7\"")).is_err());
        assert!(if_match(&h("\"7\", \"8\"")).is_err());
        assert!(if_match(&h("seven")).is_err());
        assert!(if_match(&h("+7")).is_err());
        assert!(if_match(&h("\"\"")).is_err());
        assert!(if_match(&h(&"1".repeat(21))).is_err());
        assert_eq!(
            if_match(&h("99999999999999999999")).ok(),
            Some(Some(u64::MAX))
        );
    }

    /// The `IfMatch` schema of the document takes exactly what the parser takes.
    #[test]
    fn if_match_follows_its_schema() {
        let schema = serde_json::to_value(
            <super::super::schemas::IfMatch as utoipa::PartialSchema>::schema(),
        )
        .expect("schema");
        let pattern =
            regex::Regex::new(schema["pattern"].as_str().expect("pattern")).expect("regex");
        for v in [
            "*",
            "0",
            "7",
            "\"7\"",
            "007",
            "18446744073709551615",
            "99999999999999999999",
            "123456789012345678901",
            "\"\"",
            "",
            "+7",
            "-7",
            "W/\"7\"",
            "\"7",
            "7\"",
            "seven",
            "**",
            "\"*\"",
            "1 2",
            "\"7\", \"8\"",
        ] {
            assert_eq!(pattern.is_match(v), if_match(&h(v)).is_ok(), "{v:?}");
        }
    }
}
