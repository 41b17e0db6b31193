//! The typed change feed: what each applied entry changed, as an enum, for
//! the gateway's own consumers (the device sessions, the peer table, REST
//! waits). The public event stream (`GET /v1/events`) is each change
//! rendered as `{kind, data}` ([`Change::kind`], [`Change::data`]), so the
//! two never disagree.

use serde_json::{Value, json};

use super::StateError;
use super::rows::to_json_value;
use crate::jobs::Job;
use crate::ops::{Command, Device, Role, TokenInfo};

/// A step of a command's life that changed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStep {
    /// Issued (`command.issued`), queued for its device.
    Issued,
    /// Published to the device's session (`command.sent`).
    Sent,
    /// The device has it (`command.accepted`).
    Accepted,
    /// The device answered (`command.result`: succeeded or failed).
    Result,
    /// An operator canceled it (`command.canceled`).
    Canceled,
}

/// What the commands of one launch of a job's executions share.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchedCommand {
    /// Command name.
    pub name: String,
    /// Parameters.
    pub params: Value,
    /// Issue time (ms since the epoch): the launching entry's stamp.
    pub issued_at: u64,
    /// Expiry time (ms since the epoch).
    pub expires_at: u64,
}

/// One execution launched: its device and its command's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    /// Device id.
    pub device: String,
    /// Command id (`jobs::command_id`).
    pub command: String,
}

/// A step of a job's life that changed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStep {
    /// Created (`job.created`).
    Created,
    /// Started (`job.started`).
    Started,
    /// Every execution finished (`job.completed`).
    Completed,
    /// Its abort rule tripped (`job.aborted`).
    Aborted,
    /// An operator canceled it (`job.canceled`).
    Canceled,
}

/// Which of a shadow's documents a patch changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowSide {
    /// The desired document (`shadow.desired`; the version moved).
    Desired,
    /// The reported document (`shadow.reported`).
    Reported,
}

/// What one applied entry changed. An entry that changed nothing yields
/// none.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An API token was created (`token`; never with its hash).
    Token(TokenInfo),
    /// An API token was revoked (`token.revoked`).
    TokenRevoked {
        /// Its id.
        id: String,
        /// Its name.
        name: String,
        /// Its role.
        role: Role,
    },
    /// An API token got a new secret (`token.rotated`).
    TokenRotated {
        /// Its id.
        id: String,
    },
    /// A device was registered (`device.registered`).
    DeviceRegistered(Device),
    /// Devices were registered together, in one entry
    /// (`devices.registered`): their ids, in the order of the request. The
    /// public event carries the ids only (one entry, one event id; a
    /// batch's devices with their attributes could be megabytes).
    DevicesRegistered {
        /// The ids.
        ids: Vec<String>,
    },
    /// A device's labels or attributes changed (`device.updated`).
    DeviceUpdated(Device),
    /// A device was deleted with its shadow and commands (`device.deleted`).
    DeviceDeleted {
        /// Its id.
        id: String,
    },
    /// A device got a new secret (`device.secret_rotated`).
    SecretRotated {
        /// Its id.
        id: String,
    },
    /// A device's session started or ended somewhere (`device.presence`).
    Presence {
        /// The device after the change (`online`, `gateway`).
        device: Device,
        /// The epoch of the session the change names.
        epoch: u64,
    },
    /// A command moved on (`command.issued`, `.sent`, `.accepted`,
    /// `.result`, `.canceled`).
    Command(CommandStep, Command),
    /// Commands whose TTL passed (`command.expired`).
    CommandsExpired(Vec<Command>),
    /// A patch was merged into a shadow (`shadow.desired`,
    /// `shadow.reported`): the change, not the documents.
    Shadow {
        /// Which document.
        side: ShadowSide,
        /// The device.
        device: String,
        /// The desired version after the change.
        version: u64,
        /// The merge patch applied.
        patch: Value,
    },
    /// A gateway's sessions were declared lost (`gateway.sessions_lost`).
    SessionsLost {
        /// The gateway.
        gateway: u64,
        /// The devices that were online there.
        devices: Vec<String>,
    },
    /// A job moved on (`job.created`, `.started`, `.completed`,
    /// `.aborted`, `.canceled`): the job after the change.
    Job(JobStep, Box<Job>),
    /// Executions of a job were launched (`job.launched`): their commands,
    /// as issued (the device sessions deliver them as any issued command).
    /// The public event carries the job and the command and device ids.
    JobLaunched {
        /// The job.
        job: String,
        /// What every one of these commands carries, once: a launch issues
        /// up to `MAX_LAUNCH` commands of one name and params (up to 64 KiB),
        /// and the change feed holds 4,096 changes.
        command: std::sync::Arc<LaunchedCommand>,
        /// The executions launched, in launch order.
        executions: Vec<Launched>,
    },
    /// Finished jobs were deleted with their executions (`jobs.pruned`).
    JobsPruned {
        /// The jobs deleted, in the order they were.
        jobs: Vec<String>,
    },
    /// A peer's address was set (`cluster.peer`).
    PeerAddress {
        /// The member's node id.
        id: u64,
        /// Its address, `host:port`.
        address: String,
    },
}

impl Change {
    /// The public event's kind (the SSE `event`): the kind of the operation
    /// that made the change.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Token(_) => "token",
            Change::TokenRevoked { .. } => "token.revoked",
            Change::TokenRotated { .. } => "token.rotated",
            Change::DeviceRegistered(_) => "device.registered",
            Change::DevicesRegistered { .. } => "devices.registered",
            Change::DeviceUpdated(_) => "device.updated",
            Change::DeviceDeleted { .. } => "device.deleted",
            Change::SecretRotated { .. } => "device.secret_rotated",
            Change::Presence { .. } => "device.presence",
            Change::Command(step, _) => match step {
                CommandStep::Issued => "command.issued",
                CommandStep::Sent => "command.sent",
                CommandStep::Accepted => "command.accepted",
                CommandStep::Result => "command.result",
                CommandStep::Canceled => "command.canceled",
            },
            Change::CommandsExpired(_) => "command.expired",
            Change::Shadow {
                side: ShadowSide::Desired,
                ..
            } => "shadow.desired",
            Change::Shadow {
                side: ShadowSide::Reported,
                ..
            } => "shadow.reported",
            Change::SessionsLost { .. } => "gateway.sessions_lost",
            Change::PeerAddress { .. } => "cluster.peer",
            Change::Job(step, _) => match step {
                JobStep::Created => "job.created",
                JobStep::Started => "job.started",
                JobStep::Completed => "job.completed",
                JobStep::Aborted => "job.aborted",
                JobStep::Canceled => "job.canceled",
            },
            Change::JobLaunched { .. } => "job.launched",
            Change::JobsPruned { .. } => "jobs.pruned",
        }
    }

    /// The public event's data (the SSE `data`), as the OpenAPI document's
    /// `StreamEvent` describes it per kind.
    pub fn data(&self) -> Result<Value, StateError> {
        Ok(match self {
            Change::Token(t) => json!({
                "id": t.id, "role": t.role.as_str(), "name": t.name, "expires_at": t.expires_at,
            }),
            Change::TokenRevoked { id, name, role } => {
                json!({ "id": id, "role": role.as_str(), "name": name })
            }
            Change::TokenRotated { id } => json!({ "id": id }),
            Change::DeviceRegistered(d)
            | Change::DeviceUpdated(d)
            | Change::Presence { device: d, .. } => to_json_value(d)?,
            Change::DeviceDeleted { id } | Change::SecretRotated { id } => json!({ "id": id }),
            Change::DevicesRegistered { ids } => json!({ "devices": ids }),
            Change::Command(_, c) => to_json_value(c)?,
            Change::CommandsExpired(cmds) => json!({ "commands": to_json_value(cmds)? }),
            Change::Shadow {
                device,
                version,
                patch,
                ..
            } => json!({ "device": device, "version": version, "patch": patch }),
            Change::SessionsLost { gateway, devices } => {
                json!({ "gateway": gateway, "devices": devices })
            }
            Change::PeerAddress { id, address } => json!({ "id": id, "address": address }),
            Change::Job(_, job) => to_json_value(job)?,
            Change::JobsPruned { jobs } => json!({ "jobs": jobs }),
            Change::JobLaunched {
                job, executions, ..
            } => json!({
                "job": job,
                "executions": executions
                    .iter()
                    .map(|e| json!({ "device": e.device, "command": e.command }))
                    .collect::<Vec<_>>(),
            }),
        })
    }
}
