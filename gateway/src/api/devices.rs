//! `/v1/devices`: register, list, read, update, delete, rotate secrets.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ENTENTE_INDEX, Problem};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, Consistency, MinIndexHeader, page_query, read_barrier, reply,
    split_page, unexpected, write,
};
use super::schemas::{DeviceId, JsonObject, LabelFilter, Labels};
use super::validate;
use crate::limits::{LimitError, MAX_BATCH_DEVICES};
use crate::ops::{Device, DeviceRegistration, MAX_CONFLICTS_LISTED, Op, OpResult};
use crate::shared::{hash_secret, random_token};
use crate::state::DeviceFilter;

/// How a new device logs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceAuth {
    /// A secret is generated and returned (its MQTT password); with
    /// `cert_sha256` the device may also log in with that certificate.
    #[default]
    Secret,
    /// No secret: the device logs in over TLS with the client certificate
    /// of `cert_sha256` only.
    Certificate,
}

/// Body of `POST /v1/devices`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id":"pump-7","labels":{"site":"north"},"attributes":{"model":"X2"}}))]
pub struct NewDevice {
    /// Device id: 1–64 characters from `A-Za-z0-9_.-`, not `.` or `..`; also
    /// its MQTT client id.
    #[schema(value_type = DeviceId)]
    pub id: String,
    /// Labels for filtering (keys `[A-Za-z0-9_./-]{1,63}`, values ≤ 256 characters).
    #[serde(default)]
    #[schema(value_type = Labels)]
    pub labels: BTreeMap<String, String>,
    /// Free-form JSON object (default `{}`).
    #[serde(default)]
    #[schema(value_type = Option<JsonObject>)]
    pub attributes: Option<Value>,
    /// SHA-256 of the DER client certificate the device may log in with
    /// over TLS (instead of a password): 64 hex digits, optionally
    /// `:`-separated pairs; stored lowercase. One certificate identifies
    /// one device (409 if another device has it).
    #[serde(default)]
    #[schema(
        example = "5d41402abc4b2a76b9719d911017c592a06b3e4f8a9c1d2e3f40516273849506",
        pattern = "^([0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31})$"
    )]
    pub cert_sha256: Option<String>,
    /// `secret` (default: a secret is generated and returned) or
    /// `certificate` (no secret; needs `cert_sha256`).
    #[serde(default)]
    pub auth: Option<DeviceAuth>,
}

/// Response of `POST /v1/devices`: the device and its MQTT password.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegisteredDevice {
    /// The registered device.
    pub device: Device,
    /// The device's secret (its MQTT password). Returned only now; only a
    /// hash is stored. Absent for a device registered with `"auth":
    /// "certificate"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Response of `POST /v1/devices/{id}/secret`.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewSecret {
    /// Device id.
    pub id: String,
    /// The new secret; the old one no longer works. Returned only now.
    pub secret: String,
}

/// Body of `PATCH /v1/devices/{id}`: each field given replaces the stored one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceUpdate {
    /// New labels (replace all labels).
    pub labels: Option<BTreeMap<String, String>>,
    /// New attributes (replace the object).
    pub attributes: Option<Value>,
    /// A new client-certificate fingerprint (as in `POST /v1/devices`), or
    /// `null` to remove it. A session that logged in with the certificate
    /// it replaces ends (MQTT 5: 0x98). 409 if another device has it.
    #[serde(default, with = "crate::ops::double_option")]
    pub cert_sha256: Option<Option<String>>,
}

impl utoipa::PartialSchema for DeviceUpdate {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        super::schemas::from_json(update_schema())
    }
}

/// What `validate::cert_sha256` accepts: 64 hex digits, or 32 pairs
/// separated by `:`.
pub(crate) const CERT_SHA256_PATTERN: &str =
    r"^([0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31})$";

/// The schema of [`DeviceUpdate`]: at least one of the fields, not null
/// (an update that changes nothing is refused, 422).
pub(crate) fn update_schema() -> Value {
    serde_json::json!({
        "type": "object",
        "description": "Body of `PATCH /v1/devices/{id}`: each field given replaces the \
            stored one; at least one of them, not null.",
        "properties": {
            "labels": {
                "description": "New labels (replace all labels).",
                "oneOf": [{"$ref": "#/components/schemas/Labels"}, {"type": "null"}],
            },
            "attributes": {
                "description": "New attributes (replace the object).",
                "oneOf": [{"$ref": "#/components/schemas/JsonObject"}, {"type": "null"}],
            },
            "cert_sha256": {
                "description": "A new client-certificate fingerprint (as in `POST /v1/devices`), \
                    or null to remove it. A session that logged in with the certificate it \
                    replaces ends (MQTT 5: 0x98). 409 if another device has it.",
                "oneOf": [{"type": "string", "pattern": CERT_SHA256_PATTERN}, {"type": "null"}],
            },
        },
        "additionalProperties": false,
        "anyOf": [
            {"required": ["labels"], "properties": {"labels": {"type": "object"}}},
            {"required": ["attributes"], "properties": {"attributes": {"type": "object"}}},
            {"required": ["cert_sha256"]},
        ],
        "example": {"labels": {"site": "south"}},
    })
}

impl ToSchema for DeviceUpdate {}

/// One page of devices.
#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePage {
    /// The devices, by id.
    pub items: Vec<Device>,
    /// Pass as `?after=` to get the next page; absent on the last page.
    pub next: Option<String>,
}

/// Query of `GET /v1/devices`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListDevicesQuery {
    /// Only devices with this label, as `key=value`.
    #[param(example = "site=north", value_type = Option<LabelFilter>)]
    pub label: Option<String>,
    /// Only online (`true`) or offline (`false`) devices.
    pub online: Option<bool>,
    /// The `next` cursor of the previous page.
    #[param(value_type = Option<DeviceId>)]
    pub after: Option<String>,
    /// Page size (default 100, at most the gateway's `max_page`, 1000 by default).
    pub limit: Option<u32>,
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// Query of single-resource reads.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// `linearizable` (default) or `local`.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

/// Generates a device secret; failure to read the OS random source is logged.
pub(crate) fn new_secret() -> Result<String, ApiError> {
    random_token().map_err(|e| {
        tracing::error!(error = %e, "generating a secret");
        ApiError::internal()
    })
}

/// Register a device.
///
/// The response carries the device's secret (its MQTT password) — the only
/// time it is shown. A device may instead (`"auth": "certificate"`) or as
/// well log in over TLS with the client certificate of `cert_sha256`.
#[utoipa::path(
    post, path = "/v1/devices", tag = "devices",
    request_body = NewDevice,
    responses(
        (status = 201, description = "Registered", body = RegisteredDevice,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The id is taken, or another device has the certificate fingerprint", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large, or attributes over 64 KiB as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (ids, labels, a `cert_sha256` that is not 64 hex digits, `\"auth\": \"certificate\"` without one; attributes not an object, nested over 32 levels, or with integers beyond 64 bits)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_device(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NewDevice>,
) -> Result<Response, ApiError> {
    let secret = match body.auth.unwrap_or_default() {
        DeviceAuth::Secret => Some(new_secret()?),
        DeviceAuth::Certificate => None,
    };
    let id = body.id.clone();
    let op = register_op(body, secret.as_deref().map(hash_secret).unwrap_or_default())?;
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Device(device) => Ok(reply(
            StatusCode::CREATED,
            index,
            &RegisteredDevice { device, secret },
        )),
        OpResult::Conflict(why) if why.contains("certificate") => Err(ApiError::conflict(format!(
            "{why}; a certificate identifies one device: give {id:?} a certificate of its own"
        ))
        .with_index(index)),
        OpResult::Conflict(_) => Err(ApiError::conflict(format!(
            "a device with id {id:?} is already registered; choose another id, or rotate its \
             secret with POST /v1/devices/{id}/secret"
        ))
        .with_index(index)),
        r => Err(unexpected("register device", &r, index)),
    }
}

/// Checks a registration and builds the operation `POST /v1/devices`
/// proposes (`secret_hash`: of the secret generated for it, empty for
/// none).
pub(crate) fn register_op(body: NewDevice, secret_hash: String) -> Result<Op, ApiError> {
    let d = registration(body, secret_hash).map_err(|(_, e)| e)?;
    Ok(Op::RegisterDevice {
        id: d.id,
        secret_hash: d.secret_hash,
        labels: d.labels,
        attributes: d.attributes,
        cert_sha256: d.cert_sha256,
    })
}

/// Checks one device's registration: the device as an entry carries it, or
/// the field that is wrong (its name in the body) and why.
fn registration(
    body: NewDevice,
    secret_hash: String,
) -> Result<DeviceRegistration, (&'static str, ApiError)> {
    validate::body_device_id(&body.id).map_err(|e| ("id", e))?;
    validate::labels(&body.labels).map_err(|e| ("labels", e))?;
    let attributes = body
        .attributes
        .unwrap_or_else(|| Value::Object(Default::default()));
    validate::object("attributes", &attributes)
        .and_then(|()| validate::json_value("attributes", &attributes))
        .map_err(|e| ("attributes", e))?;
    let cert_sha256 = body
        .cert_sha256
        .as_deref()
        .map(validate::cert_sha256)
        .transpose()
        .map_err(|e| ("cert_sha256", e))?;
    if body.auth == Some(DeviceAuth::Certificate) && cert_sha256.is_none() {
        return Err((
            "auth",
            ApiError::invalid(
                "\"auth\": \"certificate\" needs cert_sha256, the SHA-256 of the device's \
                 client certificate; without it the device could not log in",
            ),
        ));
    }
    Ok(DeviceRegistration {
        id: body.id,
        secret_hash,
        labels: body.labels,
        attributes,
        cert_sha256,
    })
}

/// The path of the batch registration. The same path with GET, PATCH and
/// DELETE is `/v1/devices/{id}` of a device named `batch` (an id the API
/// has always allowed): see [`batch_named_device`].
pub(crate) const BATCH_PATH: &str = "/v1/devices/batch";

/// Most `POST /v1/devices/batch` requests a gateway works on at once. Each
/// holds its body (up to `batch_max_body_bytes`, 4 MiB by default) and
/// what it decodes to until its entry is proposed; more wait for a place,
/// at most the write timeout, and then get 503 `batch-busy`.
pub(crate) const BATCHES_AT_ONCE: usize = 4;

/// The places of [`BATCHES_AT_ONCE`].
#[derive(Debug)]
pub(crate) struct BatchSlots(Arc<Semaphore>);

impl BatchSlots {
    pub(crate) fn new() -> BatchSlots {
        BatchSlots(Arc::new(Semaphore::new(BATCHES_AT_ONCE)))
    }

    /// A place for one batch, waiting at most `wait`.
    async fn enter(&self, wait: Duration) -> Result<OwnedSemaphorePermit, ApiError> {
        match tokio::time::timeout(wait, self.0.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::unavailable(
                "batch-busy",
                format!(
                    "this gateway is working on {BATCHES_AT_ONCE} batch registrations already; \
                     nothing of this one was registered — retry shortly, or on another gateway"
                ),
                1,
            )),
        }
    }
}

/// Body of `POST /v1/devices/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"devices": [
    {"id": "pump-7", "labels": {"site": "north"}, "attributes": {"model": "X2"}},
    {"id": "pump-8", "labels": {"site": "north"}}
]}))]
pub struct NewDevices {
    /// 1 to 1,000 devices, each as the body of `POST /v1/devices`. Their
    /// ids, and their certificate fingerprints, must differ (409 if two
    /// are the same).
    #[serde(deserialize_with = "at_most_a_batch")]
    #[schema(min_items = 1, max_items = 1000)]
    pub devices: Vec<NewDevice>,
}

/// Reads the devices of a batch, refusing the 1,001st as soon as it is met
/// (the body's size alone would let hundreds of thousands of tiny devices
/// be decoded first).
fn at_most_a_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<NewDevice>, D::Error> {
    struct Devices;
    impl<'de> serde::de::Visitor<'de> for Devices {
        type Value = Vec<NewDevice>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of 1 to {MAX_BATCH_DEVICES} devices")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_BATCH_DEVICES));
            while let Some(d) = seq.next_element()? {
                if out.len() == MAX_BATCH_DEVICES {
                    return Err(serde::de::Error::custom(format!(
                        "a batch registers at most {MAX_BATCH_DEVICES} devices; send the rest \
                         in further batches"
                    )));
                }
                out.push(d);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Devices)
}

/// One device of a batch registration's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchDevice {
    /// Device id.
    #[schema(value_type = DeviceId)]
    pub id: String,
    /// The device's secret (its MQTT password), as `POST /v1/devices`
    /// returns it: only now; only a hash is stored. Absent for a device
    /// registered with `"auth": "certificate"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Response of `POST /v1/devices/batch`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"index": 42, "devices": [
    {"id": "pump-7", "secret": "9f3c1a7e5b2d4c6e8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5"},
    {"id": "pump-8", "secret": "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e"}
]}))]
pub struct RegisteredDevices {
    /// The log index of the one entry that registered them all (as
    /// `Entente-Index`).
    pub index: u64,
    /// Every device, in the order of the request.
    pub devices: Vec<BatchDevice>,
}

/// Register up to 1,000 devices at once.
///
/// All or none, in one log entry: every device is checked before anything
/// is proposed (a bad one is refused naming its position, e.g.
/// `/devices/17/id`), and if any id is already registered, or any
/// certificate fingerprint is another device's, none is registered (409,
/// naming them). The answer carries each device's secret, in the order of
/// the request — the only time they are shown. Each device is as
/// `POST /v1/devices` registers it; the event stream announces them as one
/// `devices.registered` event. The body may be up to 4 MiB (the gateway's
/// `batch_max_body_bytes`); GET, PATCH and DELETE on this path address the
/// device whose id is `batch`.
#[utoipa::path(
    post, path = "/v1/devices/batch", tag = "devices",
    request_body = NewDevices,
    responses(
        (status = 201, description = "All registered, in one entry", body = RegisteredDevices,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Nothing registered: some ids are taken, or some certificate fingerprints are other devices' — or two devices of the batch share an id or a fingerprint (`pointer` names the second). `conflicting_ids` names them (at most 100)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the batch limit (4 MiB by default), a device's attributes over 64 KiB as JSON (`pointer` names it), or a log entry over 8 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No devices or more than 1,000, or a device's fields are invalid as in `POST /v1/devices` (`pointer` names the field, e.g. `/devices/17/id`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: the gateway works on 4 batches already (`batch-busy`, not applied), no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_devices(
    State(state): State<AppState>,
    Extension(slots): Extension<Arc<BatchSlots>>,
    req: Request,
) -> Result<Response, ApiError> {
    // A place first: the body is read only with one.
    let _slot = slots.enter(state.config.write_timeout).await?;
    let ApiJson(body) = ApiJson::<NewDevices>::from_request(req, &state).await?;
    let n = body.devices.len();
    if n == 0 {
        return Err(ApiError::from(LimitError::BatchSize { count: 0 }).at("/devices".into()));
    }
    let mut devices = Vec::with_capacity(n);
    let mut secrets = Vec::with_capacity(n);
    for (i, item) in body.devices.into_iter().enumerate() {
        let secret = match item.auth.unwrap_or_default() {
            DeviceAuth::Secret => Some(new_secret()?),
            DeviceAuth::Certificate => None,
        };
        let hash = secret.as_deref().map(hash_secret).unwrap_or_default();
        let d =
            registration(item, hash).map_err(|(field, e)| e.at(format!("/devices/{i}/{field}")))?;
        devices.push(d);
        secrets.push(secret);
    }
    twice_in_batch(&devices)?;
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    // `write` checks the entry's size first (413 over 8 MiB, nothing
    // proposed).
    let op = Op::RegisterDevices { devices };
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Done => {
            let devices = ids
                .into_iter()
                .zip(secrets)
                .map(|(id, secret)| BatchDevice { id, secret })
                .collect();
            Ok(reply(
                StatusCode::CREATED,
                index,
                &RegisteredDevices { index, devices },
            ))
        }
        OpResult::BatchConflict { conflicts, total } => {
            Err(batch_conflict(n, &conflicts, total).with_index(index))
        }
        r => Err(unexpected("register devices", &r, index)),
    }
}

/// 409 for a batch whose devices `conflicts` (of `total`) conflict with the
/// registry.
fn batch_conflict(n: usize, conflicts: &[(String, String)], total: usize) -> ApiError {
    const NAMED: usize = 5;
    let named: Vec<String> = conflicts
        .iter()
        .take(NAMED)
        .map(|(id, why)| format!("{id:?} ({why})"))
        .collect();
    let more = if total > named.len() {
        format!(" and {} more", total - named.len())
    } else {
        String::new()
    };
    ApiError::conflict(format!(
        "{total} of the {n} devices conflict with the registry, so none was registered: {}{more}; \
         leave them out (or delete the registered ones) and send the batch again",
        named.join(", ")
    ))
    .with_conflicting_ids(conflicts.iter().map(|(id, _)| id.clone()).collect())
}

/// 409 if two devices of a batch have the same id or the same certificate
/// fingerprint: the second cannot be registered once the first is (the
/// document cannot say "distinct ids", so a request it allows may have
/// them; it is refused as a conflict, as an id already registered is).
fn twice_in_batch(devices: &[DeviceRegistration]) -> Result<(), ApiError> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(devices.len());
    let mut certs: HashMap<&str, usize> = HashMap::new();
    let mut first: Option<ApiError> = None;
    let mut twice = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let clash = if let Some(&j) = ids.get(d.id.as_str()) {
            Some(("id", format!("{:?} is also the id of /devices/{j}", d.id)))
        } else {
            ids.insert(&d.id, i);
            let cert = d.cert_sha256.as_deref();
            match cert.and_then(|c| certs.get(c)) {
                Some(&j) => Some((
                    "cert_sha256",
                    format!("the certificate fingerprint is also the one of /devices/{j}"),
                )),
                None => {
                    if let Some(c) = cert {
                        certs.insert(c, i);
                    }
                    None
                }
            }
        };
        if let Some((field, why)) = clash {
            if twice.len() < MAX_CONFLICTS_LISTED {
                twice.push(d.id.clone());
            }
            if first.is_none() {
                first = Some(
                    ApiError::conflict(format!(
                        "{why}; a device is registered once, and a certificate identifies one \
                         device — nothing was registered"
                    ))
                    .at(format!("/devices/{i}/{field}")),
                );
            }
        }
    }
    match first {
        Some(e) => Err(e.with_conflicting_ids(twice)),
        None => Ok(()),
    }
}

/// `GET`, `PATCH` and `DELETE /v1/devices/batch`: the routes of
/// `/v1/devices/{id}` for the device whose id is `batch`, which the static
/// path of the batch registration would otherwise hide, with those
/// routes' roles. The OpenAPI document describes them as copies of those
/// routes' operations without the `id` parameter (`openapi::refine`).
pub(crate) mod batch_named_device {
    use super::*;

    fn id() -> ApiPath<String> {
        ApiPath("batch".to_string())
    }

    pub(crate) async fn get(
        state: State<AppState>,
        headers: HeaderMap,
        q: ApiQuery<ReadQuery>,
    ) -> Result<Response, ApiError> {
        get_device(state, id(), headers, q).await
    }

    pub(crate) async fn patch(
        state: State<AppState>,
        body: ApiJson<DeviceUpdate>,
    ) -> Result<Response, ApiError> {
        update_device(state, id(), body).await
    }

    pub(crate) async fn delete(state: State<AppState>) -> Result<Response, ApiError> {
        delete_device(state, id()).await
    }
}

/// List devices.
///
/// Ordered by id; filter by one label and by presence; page with `after`/`next`.
#[utoipa::path(
    get, path = "/v1/devices", tag = "devices",
    params(ListDevicesQuery, MinIndexHeader),
    responses(
        (status = 200, description = "One page", body = DevicePage,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid query, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ListDevicesQuery>,
) -> Result<Response, ApiError> {
    let limit = validate::limit(q.limit, state.config.max_page)?;
    let label = q.label.as_deref().map(validate::label_filter).transpose()?;
    if let Some(after) = &q.after {
        validate::path_device_id(after)?;
    }
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    let filter = DeviceFilter {
        label,
        online: q.online,
    };
    let page = page_query(q.after, limit);
    let items = state.db.list_devices(&filter, &page).await?;
    let (items, next) = split_page(items, limit, |d| &d.id);
    Ok(reply(
        StatusCode::OK,
        ctx.index,
        &DevicePage { items, next },
    ))
}

/// Get a device.
#[utoipa::path(
    get, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = DeviceId, Path, description = "Device id"), ReadQuery, MinIndexHeader),
    responses(
        (status = 200, description = "The device", body = Device,
            headers(("Entente-Index" = u64, description = "Applied log index the read reflects"))),
        (status = 400, description = "Invalid id, or an `Entente-Min-Index` that is not a log index", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Entente-Min-Index` was never issued (`min-index-not-issued`; `Entente-Index` is the group's commit index): more than 1000 entries beyond the group's commit index, refused at once; or, on the leader, still beyond it when the wait (the write timeout) is over", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout, with `Retry-After`: no leader or no quorum for a linearizable read (`no-leader`, `read-timeout`), `Entente-Min-Index` not reached here within the write timeout (`min-index-not-reached`), or far beyond this gateway's log while the group cannot be asked (`min-index-unknown`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_device(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Response, ApiError> {
    validate::path_device_id(&id)?;
    let ctx = read_barrier(&state, q.consistency, &headers).await?;
    match state.db.device(&id).await? {
        Some(d) => Ok(reply(StatusCode::OK, ctx.index, &d)),
        None => Err(device_not_found(&id).with_index(ctx.index)),
    }
}

/// 404 for a device id.
pub(crate) fn device_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no device with id {id:?} is registered (register it with POST /v1/devices)"
    ))
}

/// Update a device's labels, attributes and/or certificate fingerprint.
///
/// Replacing or removing `cert_sha256` ends a session that logged in with
/// the old certificate.
#[utoipa::path(
    patch, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = DeviceId, Path, description = "Device id")),
    request_body = DeviceUpdate,
    responses(
        (status = 200, description = "The updated device", body = Device,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id or malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Another device has the certificate fingerprint", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large, or attributes over 64 KiB as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (labels, a `cert_sha256` that is not 64 hex digits; attributes not an object, nested over 32 levels, or with integers beyond 64 bits)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn update_device(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<DeviceUpdate>,
) -> Result<Response, ApiError> {
    let op = update_op(&id, body)?;
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Device(d) => Ok(reply(StatusCode::OK, index, &d)),
        OpResult::NotFound(_) => Err(device_not_found(&id).with_index(index)),
        OpResult::Conflict(why) => Err(ApiError::conflict(format!(
            "{why}; a certificate identifies one device: give {id:?} a certificate of its own"
        ))
        .with_index(index)),
        r => Err(unexpected("update device", &r, index)),
    }
}

/// Checks an update of device `id` and builds the operation
/// `PATCH /v1/devices/{id}` proposes.
pub(crate) fn update_op(id: &str, body: DeviceUpdate) -> Result<Op, ApiError> {
    validate::path_device_id(id)?;
    if body.labels.is_none() && body.attributes.is_none() && body.cert_sha256.is_none() {
        return Err(ApiError::invalid(
            "give labels, attributes or cert_sha256; an empty update changes nothing",
        ));
    }
    if let Some(l) = &body.labels {
        validate::labels(l)?;
    }
    if let Some(a) = &body.attributes {
        validate::object("attributes", a)?;
        validate::json_value("attributes", a)?;
    }
    let cert_sha256 = match body.cert_sha256 {
        Some(Some(c)) => Some(Some(validate::cert_sha256(&c)?)),
        other => other,
    };
    Ok(Op::UpdateDevice {
        id: id.to_string(),
        labels: body.labels,
        attributes: body.attributes,
        cert_sha256,
    })
}

/// Delete a device, with its shadow and commands.
#[utoipa::path(
    delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = DeviceId, Path, description = "Device id")),
    responses(
        (status = 204, description = "Deleted",
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete_device(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    validate::path_device_id(&id)?;
    let (index, result) = write(&state, Op::DeleteDevice { id: id.clone() }).await?;
    match result {
        OpResult::Done | OpResult::Device(_) => {
            Ok((StatusCode::NO_CONTENT, [(ENTENTE_INDEX, index)]).into_response())
        }
        OpResult::NotFound(_) | OpResult::Ignored => Err(device_not_found(&id).with_index(index)),
        r => Err(unexpected("delete device", &r, index)),
    }
}

/// Rotate a device's secret.
///
/// The new secret is returned once; the old one stops working, and a
/// session that logged in with it ends (one that logged in with the
/// device's certificate stays). A device registered with a certificate
/// only gets a secret this way.
#[utoipa::path(
    post, path = "/v1/devices/{id}/secret", tag = "devices",
    params(("id" = DeviceId, Path, description = "Device id")),
    responses(
        (status = 200, description = "The new secret", body = NewSecret,
            headers(("Entente-Index" = u64, description = "Log index of the write"))),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs the operator role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Within twice the write timeout plus 1 s, with `Retry-After`: no leader (`no-leader`, not applied), not committed within the write timeout (`write-timeout`, outcome unknown), leadership changed (`write-dropped`, not applied), the group is busy (`write-refused`), or shutting down (`shutting-down`), or the request deadline passed (`request-timeout`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn rotate_secret(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    validate::path_device_id(&id)?;
    let secret = new_secret()?;
    let op = Op::RotateSecret {
        id: id.clone(),
        secret_hash: hash_secret(&secret),
    };
    let (index, result) = write(&state, op).await?;
    match result {
        OpResult::Done | OpResult::Device(_) => {
            Ok(reply(StatusCode::OK, index, &NewSecret { id, secret }))
        }
        OpResult::NotFound(_) => Err(device_not_found(&id).with_index(index)),
        r => Err(unexpected("rotate secret", &r, index)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches beyond the places wait for one (bounded), then are refused
    /// with 503 `batch-busy`; a place freed is taken by the next.
    #[tokio::test]
    async fn batches_beyond_the_places_wait_and_then_are_refused() {
        let slots = BatchSlots::new();
        let mut held = Vec::new();
        for _ in 0..BATCHES_AT_ONCE {
            held.push(slots.enter(Duration::ZERO).await.expect("a place"));
        }
        let refused = slots
            .enter(Duration::from_millis(20))
            .await
            .expect_err("no place");
        let p = refused.problem();
        assert_eq!(
            (p.status, p.kind.as_str()),
            (503, "urn:entente:problem:batch-busy")
        );
        // A batch waiting while all places are taken gets the one freed.
        let (waited, ()) = tokio::join!(slots.enter(Duration::from_secs(10)), async {
            tokio::task::yield_now().await;
            held.pop();
        });
        let _place = waited.expect("the freed place");
    }
}
