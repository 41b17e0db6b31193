//! The replicated operations — what one committed log entry says — and the
//! domain types they act on. Both the state machine (which applies them) and
//! the REST API (which proposes them and returns their results) use these.
//!
//! Entry format ([`ENTRY_FORMAT`] 2): a version byte, then the proposal as
//! MessagePack (`rmp-serde`, fields by name): binary and compact, and
//! self-describing, as the tagged operations and the arbitrary JSON values
//! they carry (command parameters, outputs, state patches) need. Entries
//! of format 1 (JSON, written by earlier versions; the first byte is `{`)
//! are still read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// One proposal: an operation stamped with the proposer's wall clock (ms since
/// the Unix epoch). Apply uses this stamp and never reads a clock, so every
/// replica computes the same state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// Milliseconds since the Unix epoch, read once by the proposing gateway.
    pub ts_ms: u64,
    /// What to do.
    pub op: Op,
    /// Who asked for it, for the audit trail (the `by` of its event):
    /// `token:<id>` for a REST write, `gateway:<node id>` for the gateway's
    /// own (presence, sweeps, membership), `device:<id>` for what a device
    /// sent over MQTT. Absent in entries written before it existed (their
    /// events say `null`); an older gateway ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The entry format this gateway writes: the byte that starts every entry
/// it proposes. It reads this one and format 1 (JSON, which starts with
/// `{`). Gateways of a group must speak the same format: the peer
/// handshake refuses a gateway of another one.
pub const ENTRY_FORMAT: u8 = 2;

/// The longest `by` ([`Proposal::by`]) a proposal carries: `device:` and a
/// device id, or `token:` and a token id.
pub const MAX_BY: usize = 80;

/// The deepest nesting an entry may have when decoded (as serde_json's own
/// limit for format 1). `limits::MAX_DEPTH` keeps every value a handler
/// accepts far below it.
pub const MAX_DECODE_DEPTH: usize = 128;

/// What the format of an entry's bytes appears to be, for an error message.
pub fn describe_format(bytes: &[u8]) -> String {
    match bytes.first() {
        None => "an empty entry".to_string(),
        Some(b'{') => "entry format 1 (JSON), damaged".to_string(),
        Some(&ENTRY_FORMAT) => format!("entry format {ENTRY_FORMAT} (MessagePack), damaged"),
        Some(b) => format!("an unknown entry format (first byte 0x{b:02x})"),
    }
}

/// Why an entry does not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Format 1 (JSON) that does not parse.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Format 2 (MessagePack) that does not parse.
    #[error("{0}")]
    MessagePack(#[from] rmp_serde::decode::Error),
    /// A format this version does not know.
    #[error("{0}")]
    UnknownFormat(String),
}

/// The size of the entry a proposal of `op` encodes to (in
/// [`ENTRY_FORMAT`], with the widest time stamp), counted without building
/// it.
pub fn entry_len(op: &Op) -> usize {
    /// A [`Proposal`] by reference: encodes the same.
    #[derive(Serialize)]
    struct ProposalRef<'a> {
        ts_ms: u64,
        op: &'a Op,
        by: &'a str,
    }
    /// Counts bytes written.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(1);
    // The longest `by` a proposal carries.
    let by = "x".repeat(MAX_BY);
    let p = ProposalRef {
        ts_ms: u64::MAX,
        op,
        by: &by,
    };
    // Plain data with string map keys: serialising cannot fail.
    let _ = rmp_serde::encode::write_named(&mut c, &p);
    c.0
}

impl Proposal {
    /// Encodes for the log, in [`ENTRY_FORMAT`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![ENTRY_FORMAT];
        // Plain data with string map keys: serialising to a Vec cannot fail.
        if let Err(e) = rmp_serde::encode::write_named(&mut out, self) {
            tracing::error!(error = %e, "encoding a proposal");
        }
        out
    }

    /// Encodes in format 1 (JSON), as earlier versions did.
    pub fn encode_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a log entry of format 2 or 1.
    pub fn decode(bytes: &[u8]) -> Result<Proposal, DecodeError> {
        match bytes.first() {
            Some(&ENTRY_FORMAT) => {
                let mut de = rmp_serde::Deserializer::from_read_ref(&bytes[1..]);
                de.set_max_depth(MAX_DECODE_DEPTH);
                Ok(Proposal::deserialize(&mut de)?)
            }
            Some(b'{') => Ok(serde_json::from_slice(bytes)?),
            _ => Err(DecodeError::UnknownFormat(describe_format(bytes))),
        }
    }
}

/// The operations whose apply may touch many rows though their entry is
/// small (a job's start evaluates a selector of up to
/// [`crate::jobs::MAX_SELECTED_DEVICES`] devices; a launch issues up to
/// [`crate::jobs::MAX_LAUNCH`] commands; an abort or a cancel cancels every
/// queued execution; a creation checks and inserts up to
/// [`crate::jobs::MAX_JOB_DEVICES`]; a pruning deletes up to
/// [`crate::jobs::PRUNE_MAX_EXECUTIONS`] executions): apply runs a batch
/// holding one where the runtime expects blocking work, as a large batch.
const HEAVY_OPS: [&str; 6] = [
    "create_job",
    "start_job",
    "launch_executions",
    "abort_job",
    "cancel_job",
    "prune_jobs",
];

/// Whether the entry `bytes` holds one of the operations whose apply is
/// heavy whatever the entry's size (see [`HEAVY_OPS`]). Reads only the
/// operation's tag (the rest is skipped, not built); an entry that does not
/// decode is not heavy (apply refuses it anyway).
pub fn entry_is_heavy(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Tag {
        op: String,
    }
    #[derive(Deserialize)]
    struct Peek {
        op: Tag,
    }
    let peek: Option<Peek> = match bytes.first() {
        Some(&ENTRY_FORMAT) => {
            let mut de = rmp_serde::Deserializer::from_read_ref(&bytes[1..]);
            de.set_max_depth(MAX_DECODE_DEPTH);
            Peek::deserialize(&mut de).ok()
        }
        Some(b'{') => serde_json::from_slice(bytes).ok(),
        _ => None,
    };
    peek.is_some_and(|p| HEAVY_OPS.contains(&p.op.op.as_str()))
}

/// A replicated operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Creates the first admin token, only if no token exists yet. Its id
    /// is [`BOOTSTRAP_TOKEN_ID`].
    BootstrapAdmin {
        /// SHA-256 (hex) of the token.
        token_hash: String,
    },
    /// Creates an API token. Conflict if the id or the hash exists, or if
    /// the group has [`MAX_TOKENS`] tokens already.
    CreateToken {
        /// SHA-256 (hex) of the token.
        token_hash: String,
        /// What it may do.
        role: Role,
        /// A label for people.
        name: String,
        /// Its id, chosen by the proposer (`tok-` and 16 hex digits).
        /// Entries written before ids existed have none: the token's id is
        /// then `t<log index>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// When it stops working (ms since the Unix epoch); never if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// Revokes (deletes) an API token. NotFound if there is none with the
    /// id; Conflict if it is an admin token and no other admin token
    /// without an expiry would remain (so the group always keeps one).
    RevokeToken {
        /// The token's id.
        id: String,
    },
    /// Replaces a token's secret (its hash); the old secret stops working.
    /// NotFound if there is no token with the id; Conflict if the hash
    /// exists.
    RotateToken {
        /// The token's id.
        id: String,
        /// SHA-256 (hex) of the new secret.
        token_hash: String,
    },
    /// When tokens were last used, as a gateway saw them (its flush of
    /// the uses it recorded, at most once a minute): each token's
    /// `last_used` becomes the later of the two. Unknown ids are skipped.
    /// Yields no event.
    TokensUsed {
        /// Token id → time of its latest use (ms since the Unix epoch).
        uses: BTreeMap<String, u64>,
    },
    /// Registers a device. Conflict if the id exists, or if another device
    /// has the certificate fingerprint.
    RegisterDevice {
        /// Device id (validated by the API: `[A-Za-z0-9_.-]{1,64}`, not `.` or `..`).
        id: String,
        /// SHA-256 (hex) of the device secret; empty for a device without
        /// one (it logs in with its certificate only).
        secret_hash: String,
        /// Labels for filtering.
        labels: BTreeMap<String, String>,
        /// Free-form JSON object.
        attributes: Value,
        /// SHA-256 (lowercase hex) of the DER client certificate the device
        /// may log in with over TLS, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert_sha256: Option<String>,
    },
    /// Registers several devices in one entry (`POST /v1/devices/batch`),
    /// all or none: if any id is registered already, or any fingerprint
    /// belongs to another device (or two of the entry name the same id or
    /// fingerprint), the result is `BatchConflict` and nothing changes.
    /// Gateways before this operation existed cannot decode it and stop
    /// on it (as on any entry they cannot read).
    RegisterDevices {
        /// The devices, in the order of the request.
        devices: Vec<DeviceRegistration>,
    },
    /// Replaces labels, attributes and/or the certificate fingerprint.
    /// NotFound if the device does not exist; Conflict if another device
    /// has the fingerprint.
    UpdateDevice {
        /// Device id.
        id: String,
        /// New labels, if given.
        labels: Option<BTreeMap<String, String>>,
        /// New attributes, if given.
        attributes: Option<Value>,
        /// A new certificate fingerprint (`Some(Some)`), none any more
        /// (`Some(None)`), or unchanged (`None`).
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "double_option"
        )]
        cert_sha256: Option<Option<String>>,
    },
    /// Deletes a device with its shadow and commands.
    DeleteDevice {
        /// Device id.
        id: String,
    },
    /// Replaces a device's secret.
    RotateSecret {
        /// Device id.
        id: String,
        /// SHA-256 (hex) of the new secret.
        secret_hash: String,
    },
    /// Issues a command (status `queued`). If `idempotency_key` was already
    /// used for this device, nothing changes and the first command is the result.
    IssueCommand {
        /// Command id, chosen by the proposer (unique).
        cid: String,
        /// Target device.
        device: String,
        /// Command name.
        name: String,
        /// Parameters (any JSON).
        params: Value,
        /// Time to live; `expires_at = ts_ms + ttl_ms`.
        ttl_ms: u64,
        /// Optional client key for exactly-once issue.
        idempotency_key: Option<String>,
    },
    /// The gateway holding the device's session published the command.
    CommandSent {
        /// Command id.
        cid: String,
        /// The publishing gateway.
        gateway: u64,
    },
    /// The device said it has the command.
    CommandAccepted {
        /// Command id.
        cid: String,
    },
    /// The device's result.
    CommandResult {
        /// Command id.
        cid: String,
        /// `succeeded` or `failed`.
        succeeded: bool,
        /// What the device returned.
        output: Value,
    },
    /// An operator canceled a command (only if not terminal).
    CancelCommand {
        /// Command id.
        cid: String,
    },
    /// The leader found these commands past their expiry; each one that is
    /// still not terminal (and whose `expires_at <= ts_ms`) becomes `expired`.
    ExpireCommands {
        /// Command ids.
        cids: Vec<String>,
    },
    /// JSON merge patch (RFC 7386) of the desired state. If
    /// `expected_version` is given and differs from the shadow's version, the
    /// result is `VersionMismatch` and nothing changes.
    SetDesired {
        /// Device id.
        device: String,
        /// Merge patch.
        patch: Value,
        /// The version the client saw (If-Match).
        expected_version: Option<u64>,
    },
    /// JSON merge patch of the reported state (from the device, coalesced).
    ReportState {
        /// Device id.
        device: String,
        /// Merge patch.
        patch: Value,
    },
    /// A device's session started or ended on a gateway.
    Presence {
        /// Device id.
        device: String,
        /// Gateway (node id).
        gateway: u64,
        /// Session epoch; a stale epoch is ignored.
        epoch: u64,
        /// Online or offline.
        online: bool,
    },
    /// The leader declared a gateway down: its sessions are lost.
    GatewaySessionsLost {
        /// Gateway (node id).
        gateway: u64,
    },
    /// Where a gateway's peer listener is (recorded before it is added to
    /// the group, so every member can reach it).
    SetPeerAddress {
        /// Gateway (node id).
        id: u64,
        /// `host:port` of its peer listener.
        address: String,
    },
    /// Creates a job (state `scheduled`; the leader starts it with
    /// [`Op::StartJob`]). For a list of devices, one `queued` execution per
    /// device is created with it: NotFound naming the ids that are not
    /// registered (nothing changes). Conflict if the id exists or the group
    /// holds [`crate::jobs::MAX_ACTIVE_JOBS`] unfinished jobs. If
    /// `idempotency_key` was already used for a job, nothing changes and
    /// that job is the result ([`OpResult::JobExisting`]), whatever else
    /// this operation says; checked first.
    CreateJob {
        /// Job id, chosen by the proposer.
        id: String,
        /// The command each device gets.
        command: crate::jobs::JobCommand,
        /// Its devices, or a label selector evaluated when it starts.
        target: crate::jobs::JobTarget,
        /// The rollout bounds.
        rollout: crate::jobs::Rollout,
        /// The abort rule, if any.
        abort: Option<crate::jobs::AbortRule>,
        /// Each device's command's time to live (ms).
        timeout_ms: u64,
        /// When it may start (ms since the epoch); at once if absent.
        start_at_ms: Option<u64>,
        /// Optional client key for exactly-once creation (one job per key
        /// in the group, for as long as that job is kept: a pruned job's
        /// key names no job any more).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// Starts a scheduled job whose start time (if any) is at or before the
    /// entry's stamp: a label selector is evaluated now (one `queued`
    /// execution per device matching it, in this entry on every member);
    /// the job is `in_progress` from the entry's stamp. Anything else is
    /// ignored.
    StartJob {
        /// Job id.
        id: String,
    },
    /// Launches queued executions of an in-progress job (proposed by the
    /// leader): each one named that is still `queued` gets its command
    /// (id [`crate::jobs::command_id`]) and becomes `in_progress` — as many
    /// as `max_in_flight` and the job's launch credit
    /// ([`crate::jobs::RateCredit`], refilled to the entry's stamp and
    /// debited here) allow, none if the abort rule trips. Others are skipped, so a
    /// duplicated or stale proposal launches nothing twice.
    LaunchExecutions {
        /// Job id.
        job: String,
        /// Devices, in the order to launch them.
        devices: Vec<String>,
    },
    /// Ends an in-progress job all of whose executions finished: apply
    /// decides how — `aborted` if its abort rule trips (as
    /// [`Op::AbortJob`]), else `completed`; ignored otherwise.
    CompleteJob {
        /// Job id.
        id: String,
    },
    /// Aborts an in-progress job whose abort rule tripped (its queued
    /// executions are canceled; launched ones finish). Apply decides as for
    /// [`Op::CompleteJob`]: a job whose rule does not trip and whose
    /// executions all finished is `completed`; ignored otherwise.
    AbortJob {
        /// Job id.
        id: String,
    },
    /// Cancels a scheduled or in-progress job: its queued executions are
    /// canceled; launched ones are left to finish and still record their
    /// outcome. NotFound, or Conflict if it is already over.
    CancelJob {
        /// Job id.
        id: String,
    },
    /// Deletes finished jobs (`completed`, `canceled`, `aborted`) that
    /// finished before `finished_before` (ms since the epoch; apply uses
    /// the entry's stamp if that is earlier) with their executions, oldest
    /// first (by finish time, then id): at most
    /// [`crate::jobs::PRUNE_MAX_JOBS`] jobs and
    /// [`crate::jobs::PRUNE_MAX_EXECUTIONS`] executions an entry. A job
    /// whose executions do not all fit keeps the rest for the next entry
    /// and is deleted with its last one. The commands the jobs launched
    /// stay. Proposed by the leader ([`crate::jobs::drive`]); Ignored when
    /// there is nothing to delete.
    PruneJobs {
        /// Jobs that finished at or after this time stay.
        finished_before: u64,
    },
}

/// One device of [`Op::RegisterDevices`]: the fields of
/// [`Op::RegisterDevice`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRegistration {
    /// Device id (validated by the API).
    pub id: String,
    /// SHA-256 (hex) of the device secret; empty for a device without one.
    pub secret_hash: String,
    /// Labels for filtering.
    pub labels: BTreeMap<String, String>,
    /// Free-form JSON object.
    pub attributes: Value,
    /// SHA-256 (lowercase hex) of the DER client certificate the device may
    /// log in with over TLS, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
}

impl Op {
    /// The event kind this operation produces, for the event stream.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::BootstrapAdmin { .. } | Op::CreateToken { .. } => "token",
            Op::RevokeToken { .. } => "token.revoked",
            Op::RotateToken { .. } => "token.rotated",
            Op::TokensUsed { .. } => "token.used",
            Op::RegisterDevice { .. } => "device.registered",
            Op::RegisterDevices { .. } => "devices.registered",
            Op::UpdateDevice { .. } => "device.updated",
            Op::DeleteDevice { .. } => "device.deleted",
            Op::RotateSecret { .. } => "device.secret_rotated",
            Op::IssueCommand { .. } => "command.issued",
            Op::CommandSent { .. } => "command.sent",
            Op::CommandAccepted { .. } => "command.accepted",
            Op::CommandResult { .. } => "command.result",
            Op::CancelCommand { .. } => "command.canceled",
            Op::ExpireCommands { .. } => "command.expired",
            Op::SetDesired { .. } => "shadow.desired",
            Op::ReportState { .. } => "shadow.reported",
            Op::Presence { .. } => "device.presence",
            Op::GatewaySessionsLost { .. } => "gateway.sessions_lost",
            Op::SetPeerAddress { .. } => "cluster.peer",
            Op::CreateJob { .. } => "job.created",
            Op::StartJob { .. } => "job.started",
            Op::LaunchExecutions { .. } => "job.launched",
            Op::CompleteJob { .. } => "job.completed",
            Op::AbortJob { .. } => "job.aborted",
            Op::CancelJob { .. } => "job.canceled",
            Op::PruneJobs { .. } => "jobs.pruned",
        }
    }
}

/// `Option<Option<T>>` as a JSON field: absent is `None`, `null` is
/// `Some(None)` (set to nothing), a value is `Some(Some(value))`. Use with
/// `#[serde(default, skip_serializing_if = "Option::is_none")]`.
pub(crate) mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn deserialize<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(d).map(Some)
    }

    pub(crate) fn serialize<S, T>(v: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Serialize,
    {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }
}

/// What applying an operation produced, returned to its proposer.
#[derive(Debug, Clone, PartialEq)]
pub enum OpResult {
    /// Applied; nothing to return.
    Done,
    /// Nothing to do (e.g. a bootstrap when a token exists, a stale presence).
    Ignored,
    /// The device after the operation.
    Device(Device),
    /// The token created (never its hash).
    Token(TokenInfo),
    /// The command after the operation. `created` is false when an
    /// idempotency key returned an existing command.
    Command {
        /// The command.
        command: Command,
        /// Whether this operation created it.
        created: bool,
    },
    /// The shadow after the operation.
    Shadow(Shadow),
    /// The job after the operation.
    Job(Box<crate::jobs::Job>),
    /// The job created earlier with the idempotency key of a
    /// [`Op::CreateJob`] (nothing changed).
    JobExisting(Box<crate::jobs::Job>),
    /// The thing named does not exist.
    NotFound(String),
    /// The operation contradicts the current state (the message says how).
    Conflict(String),
    /// `If-Match` version mismatch; `current` is the shadow's version.
    VersionMismatch {
        /// The shadow's version.
        current: u64,
    },
    /// The change would break a limit of [`crate::limits`] (a shadow
    /// document past its maximum size); nothing changed. The message says
    /// which and by how much.
    TooLarge(String),
    /// Devices of an [`Op::RegisterDevices`] conflict with the registry or
    /// with each other; nothing was registered.
    BatchConflict {
        /// The first conflicting devices in the entry's order (at most
        /// [`MAX_CONFLICTS_LISTED`]): the id and why.
        conflicts: Vec<(String, String)>,
        /// How many devices of the entry conflict in all.
        total: usize,
    },
}

/// The most conflicting devices an [`OpResult::BatchConflict`] lists.
pub const MAX_CONFLICTS_LISTED: usize = 100;

/// The id of the first admin token (created by [`Op::BootstrapAdmin`]).
pub const BOOTSTRAP_TOKEN_ID: &str = "bootstrap";

/// The most API tokens a group holds; creating one more is refused
/// (conflict) until one is revoked.
pub const MAX_TOKENS: usize = 1_000;

/// An API token as listed: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id":"tok-5f1e0c2a9b7d4e31","name":"ci-deployer","role":"operator",
    "created_at":1764144000000u64,"expires_at":1795680000000u64,"last_used":1764147600000u64}))]
pub struct TokenInfo {
    /// Its id (`bootstrap` for the group's first admin token).
    pub id: String,
    /// A label for people.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Creation time (ms since epoch).
    pub created_at: u64,
    /// When it stops working (ms since epoch); `null` for never.
    pub expires_at: Option<u64>,
    /// Its latest use known (ms since epoch; `null` if never used): the
    /// group's record, flushed by each gateway at most once a minute, or
    /// this gateway's own later one.
    pub last_used: Option<u64>,
}

/// What a token may do. Ordered: admin ⊃ operator ⊃ viewer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads only.
    Viewer,
    /// Devices and commands.
    Operator,
    /// Everything, including cluster operations.
    Admin,
}

impl Role {
    /// The name stored in the database.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id":"pump-7","labels":{"site":"north"},"attributes":{"model":"X2"},
    "online":false,"gateway":null,"cert_sha256":null,"created_at":1764144000000u64,
    "updated_at":1764144000000u64}))]
pub struct Device {
    /// Device id.
    pub id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Free-form attributes.
    #[schema(value_type = Object)]
    pub attributes: Value,
    /// Whether a session is open on some gateway.
    pub online: bool,
    /// The gateway holding its session, if online.
    pub gateway: Option<u64>,
    /// SHA-256 (lowercase hex) of the DER client certificate the device may
    /// log in with over TLS, if it has one.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// Registration time (ms since epoch).
    pub created_at: u64,
    /// Last change (ms since epoch).
    pub updated_at: u64,
}

/// A command's lifecycle state (docs/ARCHITECTURE.md, "Devices over MQTT").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Committed; not yet published to the device.
    Queued,
    /// Published to the device's session.
    Sent,
    /// The device said it has it.
    Accepted,
    /// The device reported success.
    Succeeded,
    /// The device reported failure.
    Failed,
    /// Its TTL passed first.
    Expired,
    /// An operator canceled it.
    Canceled,
}

impl CommandStatus {
    /// All states, in lifecycle order.
    pub const ALL: [CommandStatus; 7] = [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Accepted,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Expired,
        CommandStatus::Canceled,
    ];

    /// Whether no further transition is possible.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            CommandStatus::Succeeded
                | CommandStatus::Failed
                | CommandStatus::Expired
                | CommandStatus::Canceled
        )
    }

    /// The name stored in the database and used in the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Accepted => "accepted",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
            CommandStatus::Canceled => "canceled",
        }
    }

    /// Parses a stored or query-string name.
    pub fn parse(s: &str) -> Option<CommandStatus> {
        CommandStatus::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id":"c-5f1e","device":"pump-7","name":"reboot","params":{"delay_s":5},
    "status":"queued","output":null,"idempotency_key":null,"issued_at":1764144000000u64,
    "expires_at":1764144060000u64,"updated_at":1764144000000u64}))]
pub struct Command {
    /// Command id.
    pub id: String,
    /// Target device.
    pub device: String,
    /// Name.
    pub name: String,
    /// Parameters: any JSON.
    #[schema(value_type = crate::api::schemas::JsonValue)]
    pub params: Value,
    /// Lifecycle state.
    pub status: CommandStatus,
    /// The device's output (any JSON), once it reported a result.
    #[schema(value_type = crate::api::schemas::JsonValue)]
    pub output: Option<Value>,
    /// The client's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Issue time (ms since epoch).
    pub issued_at: u64,
    /// Expiry time (ms since epoch).
    pub expires_at: u64,
    /// Last change (ms since epoch).
    pub updated_at: u64,
}

/// A device's shadow: desired and reported state and their difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"device":"pump-7","desired":{"speed":3},"reported":{"speed":2},
    "delta":{"speed":3},"version":4,"desired_updated":{"speed":1764144000000u64},
    "reported_updated":{"speed":1764143000000u64}}))]
pub struct Shadow {
    /// Device id.
    pub device: String,
    /// Desired state (JSON object).
    #[schema(value_type = Object)]
    pub desired: Value,
    /// Reported state (JSON object).
    #[schema(value_type = Object)]
    pub reported: Value,
    /// Keys of `desired` whose value differs from `reported` (recursively for
    /// objects), with the desired value.
    #[schema(value_type = Object)]
    pub delta: Value,
    /// Incremented on every change of `desired`.
    pub version: u64,
    /// Per top-level key of `desired`: when it last changed (ms since epoch).
    pub desired_updated: BTreeMap<String, u64>,
    /// Per top-level key of `reported`: when it last changed (ms since epoch).
    pub reported_updated: BTreeMap<String, u64>,
}

/// One committed change, as streamed on `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// The log index of the entry that made the change (the SSE `id`).
    pub index: u64,
    /// What happened, e.g. `command.result` (the SSE `event`).
    pub kind: String,
    /// Details (the SSE `data`), e.g. the command after the change.
    #[schema(value_type = Object)]
    pub data: Value,
    /// Who made the change ([`Proposal::by`]): `token:<id>`,
    /// `gateway:<node id>` or `device:<id>`; `None` for entries written
    /// before the audit trail existed. The stream sends it as `data.by`.
    #[serde(default)]
    pub by: Option<String>,
}

#[cfg(test)]
mod format_tests {
    use super::*;

    fn sample() -> Proposal {
        Proposal {
            ts_ms: 1_764_144_000_123,
            op: Op::SetDesired {
                device: "pump-7".into(),
                patch: serde_json::json!({"speed": 3, "mode": null, "f": 0.1, "n": -5, "big": u64::MAX}),
                expected_version: Some(4),
            },
            by: Some("token:tok-0123456789abcdef".into()),
        }
    }

    #[test]
    fn job_operations_that_touch_many_rows_make_their_entry_heavy() {
        let entry = |op: Op| Proposal {
            ts_ms: 1,
            op,
            by: None,
        };
        let heavy = [
            Op::StartJob { id: "j-1".into() },
            Op::LaunchExecutions {
                job: "j-1".into(),
                devices: vec!["d-1".into()],
            },
            Op::AbortJob { id: "j-1".into() },
            Op::CancelJob { id: "j-1".into() },
            Op::PruneJobs { finished_before: 1 },
            Op::CreateJob {
                id: "j-1".into(),
                command: crate::jobs::JobCommand {
                    name: "reboot".into(),
                    params: serde_json::json!({}),
                },
                target: crate::jobs::JobTarget::Labels(
                    [("site".to_string(), "north".to_string())].into(),
                ),
                rollout: crate::jobs::Rollout::default(),
                abort: None,
                timeout_ms: 1000,
                start_at_ms: None,
                idempotency_key: None,
            },
        ];
        for op in heavy {
            let p = entry(op);
            // Small entries, in both formats.
            assert!(p.encode().len() < 200);
            assert!(entry_is_heavy(&p.encode()), "{:?}", p.op);
            assert!(entry_is_heavy(&p.encode_json()), "{:?}", p.op);
        }
        for op in [sample().op, Op::CompleteJob { id: "j-1".into() }] {
            assert!(!entry_is_heavy(&entry(op).encode()));
        }
        assert!(!entry_is_heavy(b""));
        assert!(!entry_is_heavy(&[ENTRY_FORMAT, 0xc1]));
    }

    #[test]
    fn entries_are_written_in_format_2_and_read_back_exactly() {
        let p = sample();
        let bytes = p.encode();
        assert_eq!(bytes[0], ENTRY_FORMAT);
        assert_eq!(Proposal::decode(&bytes).unwrap(), p);
        // `entry_len` counts what `encode` writes (with the widest stamp).
        let widest = Proposal {
            ts_ms: u64::MAX,
            op: p.op.clone(),
            by: Some("x".repeat(MAX_BY)),
        };
        assert_eq!(entry_len(&p.op), widest.encode().len());
        // Smaller than the JSON of format 1.
        assert!(bytes.len() < p.encode_json().len(), "{} bytes", bytes.len());
    }

    #[test]
    fn an_absent_and_a_removed_fingerprint_stay_apart_in_format_2() {
        for cert_sha256 in [None, Some(None), Some(Some("ab".repeat(32)))] {
            let p = Proposal {
                ts_ms: 1,
                op: Op::UpdateDevice {
                    id: "d".into(),
                    labels: None,
                    attributes: None,
                    cert_sha256,
                },
                by: None,
            };
            assert_eq!(Proposal::decode(&p.encode()).unwrap(), p);
            assert_eq!(Proposal::decode(&p.encode_json()).unwrap(), p);
        }
    }

    #[test]
    fn a_batch_registration_reads_back_exactly_and_an_unknown_operation_is_refused() {
        let device = |id: &str, cert: Option<String>| DeviceRegistration {
            id: id.into(),
            secret_hash: "ab".repeat(32),
            labels: BTreeMap::from([("site".to_string(), "north".to_string())]),
            attributes: serde_json::json!({"model": "X2", "f": 0.1}),
            cert_sha256: cert,
        };
        let p = Proposal {
            ts_ms: 7,
            op: Op::RegisterDevices {
                devices: vec![device("a", None), device("b", Some("cd".repeat(32)))],
            },
            by: Some("token:bootstrap".into()),
        };
        assert_eq!(Proposal::decode(&p.encode()).unwrap(), p);
        assert_eq!(Proposal::decode(&p.encode_json()).unwrap(), p);
        // A gateway that does not know an operation cannot decode its entry
        // (and so stops on it rather than skip it): what a gateway of the
        // version before `register_devices` meets.
        let mut v: Value = serde_json::from_slice(&p.encode_json()).unwrap();
        v["op"]["op"] = "register_devices_v2".into();
        let future = Proposal::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(future.to_string().contains("unknown variant"), "{future}");
        let mut packed = vec![ENTRY_FORMAT];
        rmp_serde::encode::write_named(&mut packed, &v).unwrap();
        let future = Proposal::decode(&packed).unwrap_err();
        assert!(future.to_string().contains("unknown variant"), "{future}");
    }

    #[test]
    fn entries_written_before_by_existed_still_decode_and_token_ops_read_back() {
        // What an earlier version wrote: no `by`, and a token creation
        // without id or expiry.
        #[derive(Serialize)]
        struct Old {
            ts_ms: u64,
            op: Value,
        }
        let old = Old {
            ts_ms: 5,
            op: serde_json::json!({"op": "create_token", "token_hash": "ab", "role": "viewer",
                "name": "n"}),
        };
        let mut packed = vec![ENTRY_FORMAT];
        rmp_serde::encode::write_named(&mut packed, &old).unwrap();
        let expected = Proposal {
            ts_ms: 5,
            op: Op::CreateToken {
                token_hash: "ab".into(),
                role: Role::Viewer,
                name: "n".into(),
                id: None,
                expires_at: None,
            },
            by: None,
        };
        assert_eq!(Proposal::decode(&packed).unwrap(), expected);
        assert_eq!(
            Proposal::decode(&serde_json::to_vec(&old).unwrap()).unwrap(),
            expected
        );
        // Without `by`, an entry is byte for byte what an earlier version
        // wrote (an older member reads it).
        assert_eq!(
            Proposal {
                ts_ms: 5,
                op: Op::BootstrapAdmin {
                    token_hash: "ab".into()
                },
                by: None
            }
            .encode(),
            {
                let mut b = vec![ENTRY_FORMAT];
                rmp_serde::encode::write_named(
                    &mut b,
                    &Old {
                        ts_ms: 5,
                        op: serde_json::json!({"op": "bootstrap_admin", "token_hash": "ab"}),
                    },
                )
                .unwrap();
                b
            }
        );
        for op in [
            Op::CreateToken {
                token_hash: "cd".into(),
                role: Role::Admin,
                name: "ops".into(),
                id: Some("tok-0011223344556677".into()),
                expires_at: Some(99),
            },
            Op::RevokeToken { id: "t7".into() },
            Op::RotateToken {
                id: "bootstrap".into(),
                token_hash: "ef".into(),
            },
            Op::TokensUsed {
                uses: BTreeMap::from([("bootstrap".to_string(), 42)]),
            },
        ] {
            let p = Proposal {
                ts_ms: 1,
                op,
                by: Some("gateway:3".into()),
            };
            assert_eq!(Proposal::decode(&p.encode()).unwrap(), p);
        }
    }

    #[test]
    fn entries_of_format_1_written_by_earlier_versions_are_still_read() {
        let p = sample();
        let json = p.encode_json();
        assert_eq!(json[0], b'{');
        assert_eq!(Proposal::decode(&json).unwrap(), p);
    }

    #[test]
    fn unknown_and_damaged_entries_are_refused_with_their_format() {
        for (bytes, says) in [
            (vec![], "empty"),
            (vec![0x09, 0x80], "first byte 0x09"),
            (vec![ENTRY_FORMAT], "damaged"),
            (b"{\"ts_ms\":".to_vec(), "damaged"),
        ] {
            assert!(Proposal::decode(&bytes).is_err(), "{bytes:?}");
            assert!(describe_format(&bytes).contains(says), "{bytes:?}");
        }
    }
}
