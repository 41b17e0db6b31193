//! What a device publishes, from the PUBLISH to its acknowledgement
//! (docs/ARCHITECTURE.md, "Devices over MQTT": "Nothing acknowledged is
//! lost").
//!
//! A device's QoS 1 message is acknowledged (PUBACK; for QoS 2 the PUBREC)
//! only once what it causes is committed in the group, or once it is known
//! to change nothing (an unknown or foreign command id, a malformed or
//! oversize payload: answered at once, MQTT 5 with a reason code). The
//! endpoint hands each message to the session manager with an [`Ack`], the
//! message's claim on its answer; whoever learns the message's fate answers
//! it, and an `Ack` dropped unanswered tells the connection that the message
//! was not committed: the connection is closed without acknowledging it, so
//! the device sends it again when it reconnects.
//!
//! - Reported-state patches are coalesced per device: one proposal of a
//!   device's patches is in flight at a time, and whatever arrives meanwhile
//!   is composed into the next one (group commit per device). That one goes
//!   once the device has sent again as many patches as it had out when the
//!   one before committed — a device keeping ten in flight gets ten per
//!   proposal, one keeping one gets its patch proposed at once — or after
//!   `--report-coalesce-ms` (50 ms). Every message folded into a proposal is
//!   answered when that proposal commits.
//! - `result` messages are each their own proposal, all in flight at once,
//!   after checking that the command is the device's. An `accepted` waits
//!   [`ACCEPT_HOLD`] for its command's `result`: if the result comes, the
//!   accepted message is answered when the result commits (a result implies
//!   the device accepted the command) and costs no entry of its own;
//!   otherwise it is proposed on its own. A command a device answers at
//!   once thus costs two committed entries, issued and result.
//! - A proposal that fails (no leader, a timeout) is tried again with
//!   backoff until it commits, until no connection waits for it any more, or
//!   for [`patience`] (twice the write timeout); then its messages are not
//!   acknowledged. Every operation proposed here is idempotent (state-machine
//!   steps, merge patches), so a retry after an unknown outcome is safe.
//!
//! Bounded: each message holds a permit of the endpoint's pipeline
//! ([`PIPELINE`]) and a place in its connection's window from the moment it
//! is read until it is answered, and a connection without room stops reading
//! its socket. The proposals run in tasks the manager owns (a `JoinSet`):
//! none outlives it, and none holds anything that was acknowledged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use coordinator::node::{Node, NodeError};
use entente_protocol::{CommandResultMessage, DevicePublish, ResultStatus};
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;

use super::MqttStats;
use super::auth::LogLimiter;
use super::wire::AckCode;
use crate::ops::{Op, OpResult};
use crate::state::StateDb;

/// Device messages read and not yet answered, all connections together.
/// When every permit is taken, connections stop reading their sockets until
/// one is returned.
pub(crate) const PIPELINE: usize = 16_384;

/// How long a device's `accepted` waits for the same command's `result`
/// before it is proposed on its own (see the module docs). Its
/// acknowledgement waits as long: a device that sends its result only once
/// its `accepted` is acknowledged answers this much later.
pub(crate) const ACCEPT_HOLD: Duration = Duration::from_millis(50);

/// Longest wait for the read barrier that checks a command id this gateway
/// does not know (it may have been issued through another one a moment ago).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a device message's proposal is tried: twice the write timeout
/// (10 s by default) — an election takes well under one, a minority
/// gateway cannot commit at all.
pub(crate) fn patience(write_timeout: Duration) -> Duration {
    write_timeout.saturating_mul(2)
}

/// The answer to one device message, for its connection.
#[derive(Debug)]
pub(crate) struct Acked {
    /// The message's packet id and QoS (1 or 2); `None` for QoS 0.
    pub(crate) packet: Option<(u16, u8)>,
    /// How to acknowledge it; `None` when it was not committed (it is not
    /// acknowledged, and the connection is closed).
    pub(crate) code: Option<AckCode>,
}

/// A device message's claim on its answer (see the module docs). It holds
/// one permit of the pipeline and, through its connection's count, one
/// place in the connection's window, until it is answered or dropped.
#[derive(Debug)]
pub(crate) struct Ack {
    packet: Option<(u16, u8)>,
    /// The connection's answers. It has room for every `Ack` the connection
    /// has out (they are at most its window), so a send never fails for a
    /// full queue.
    to: mpsc::Sender<Acked>,
    stats: Arc<MqttStats>,
    _permit: OwnedSemaphorePermit,
    answered: bool,
}

impl Ack {
    pub(crate) fn new(
        packet: Option<(u16, u8)>,
        to: mpsc::Sender<Acked>,
        stats: Arc<MqttStats>,
        permit: OwnedSemaphorePermit,
    ) -> Ack {
        stats.messages_uncommitted.fetch_add(1, Ordering::Relaxed);
        Ack {
            packet,
            to,
            stats,
            _permit: permit,
            answered: false,
        }
    }

    /// Acknowledges the message with `code`.
    pub(crate) fn answer(mut self, code: AckCode) {
        self.send(Some(code));
    }

    fn send(&mut self, code: Option<AckCode>) {
        if !self.answered {
            self.answered = true;
            // A closed connection needs no answer.
            let _ = self.to.try_send(Acked {
                packet: self.packet,
                code,
            });
        }
    }

    /// Whether the message's connection is still open to hear the answer.
    fn awaited(&self) -> bool {
        !self.to.is_closed()
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        self.send(None);
        self.stats
            .messages_uncommitted
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// One device's reported-state patches on their way to the group (kept
/// while its session lasts).
struct Reports {
    /// The session they came from; a newer session's patches replace them
    /// (the device sends what was not acknowledged again).
    epoch: u64,
    /// The session has not ended.
    open: bool,
    /// Patches to propose, in order, each with the messages composed into
    /// it; the last one absorbs new patches.
    patches: Vec<(Value, Vec<Ack>)>,
    /// Messages in `patches`.
    waiting: usize,
    /// Messages in the proposal in flight (zero: none is).
    inflight: usize,
    /// The session the proposal in flight came from.
    inflight_epoch: u64,
    /// How many patches the device had out when its last proposal
    /// committed: as many are expected back before the next one (a device
    /// with ten in flight sends ten more once they are acknowledged)...
    expect: usize,
    /// ...or, counting from here, until the wait is over.
    since: Instant,
}

impl Reports {
    /// Whether the waiting patches are to be proposed now.
    fn due(&self, now: Instant, wait: Duration) -> bool {
        self.inflight == 0
            && self.waiting > 0
            && (self.waiting >= self.expect || now >= self.since + wait)
    }
}

/// A device's `accepted` messages for one command, waiting for its result
/// (see [`ACCEPT_HOLD`]).
struct HeldAccept {
    device: String,
    acks: Vec<Ack>,
    due: Instant,
}

/// What a proposal task reports when it ends.
#[derive(Debug)]
pub(crate) enum Done {
    /// A device's patches: the messages of those committed with their
    /// answers, for the manager to send (so it knows that the device's
    /// next patches cannot have been sent yet when it counts those
    /// waiting); whether all committed.
    Reports {
        device: String,
        answers: Vec<(Vec<Ack>, AckCode)>,
        committed: bool,
    },
    /// A command step (answered by the task itself).
    Command,
}

/// The device messages this gateway is committing (see the module docs):
/// owned by the session manager, which feeds it and polls its tasks.
pub(crate) struct Ingest {
    pub(crate) node: Node<OpResult>,
    pub(crate) db: Arc<StateDb>,
    pub(crate) stats: Arc<MqttStats>,
    pub(crate) max_payload: usize,
    /// Longest a device's patches wait for the rest of its window before
    /// they are proposed (`--report-coalesce-ms`).
    pub(crate) coalesce: Duration,
    /// How long one proposal is tried (see [`patience`]).
    pub(crate) patience: Duration,
    reports: HashMap<String, Reports>,
    /// Devices whose patches wait for the rest of their window (checked by
    /// [`Ingest::tick`]).
    held: HashSet<String>,
    /// `accepted` messages waiting for their command's result, by command
    /// id (bounded: each holds a permit of the pipeline).
    accepts: HashMap<String, HeldAccept>,
    /// The proposals in flight.
    pub(crate) tasks: JoinSet<Done>,
    /// The tasks proposing a device's patches, by task id (to clear the
    /// device's flag should one panic).
    flushing: HashMap<Id, String>,
    /// Ignored messages and messages not committed are logged at most once
    /// a second per kind (a flood from one device, or every device of a
    /// gateway that lost its quorum, is one line with a count).
    logs: Arc<LogLimiter>,
}

impl Ingest {
    pub(crate) fn new(
        node: Node<OpResult>,
        db: Arc<StateDb>,
        stats: Arc<MqttStats>,
        max_payload: usize,
        coalesce: Duration,
        patience: Duration,
    ) -> Ingest {
        Ingest {
            node,
            db,
            stats,
            max_payload,
            coalesce,
            patience,
            reports: HashMap::new(),
            held: HashSet::new(),
            accepts: HashMap::new(),
            tasks: JoinSet::new(),
            flushing: HashMap::new(),
            logs: Arc::default(),
        }
    }

    /// Answers a message that is ignored: it never changes anything, so
    /// it is acknowledged (MQTT 5 with `code`), logged and counted.
    fn ignore(&self, device: &str, why: &str, ack: Ack, code: AckCode) {
        ignored(&self.stats, &self.logs, device, why);
        ack.answer(code);
    }

    /// A device published `payload` to one of its topics (`kind`), in
    /// session `epoch`.
    pub(crate) fn publish(
        &mut self,
        device: String,
        epoch: u64,
        kind: DevicePublish,
        payload: Bytes,
        ack: Ack,
    ) {
        if payload.len() > self.max_payload {
            let why = format!(
                "payload of {} bytes is over the limit of {}",
                payload.len(),
                self.max_payload
            );
            return self.ignore(&device, &why, ack, AckCode::TooLarge);
        }
        match kind {
            DevicePublish::Reported => self.report(device, epoch, &payload, ack),
            DevicePublish::Accepted { cid } => self.hold_accept(device, cid, ack),
            DevicePublish::Result { cid } => {
                let msg = match crate::limits::parse_value("a command result", &payload)
                    .map_err(|e| e.to_string())
                    .and_then(|v| {
                        serde_json::from_value::<CommandResultMessage>(v).map_err(|e| e.to_string())
                    }) {
                    Ok(m) => m,
                    Err(e) => {
                        let why = format!("malformed result: {e}");
                        return self.ignore(&device, &why, ack, AckCode::Malformed);
                    }
                };
                let op = Op::CommandResult {
                    cid: cid.clone(),
                    succeeded: msg.status == ResultStatus::Succeeded,
                    output: msg.output,
                };
                // The device's `accepted` for this command, if it waits.
                let accepted = match self.accepts.get(&cid) {
                    Some(h) if h.device == device => self.accepts.remove(&cid).map(|h| h.acks),
                    _ => None,
                };
                if let Some(acks) = &accepted {
                    self.stats
                        .accepted_folded
                        .fetch_add(acks.len() as u64, Ordering::Relaxed);
                }
                self.command(device, cid, op, ack, accepted.unwrap_or_default());
            }
        }
    }

    fn report(&mut self, device: String, epoch: u64, payload: &[u8], ack: Ack) {
        // The same limits as the REST API's (depth, size, 64-bit
        // integers): what is proposed must decode on every member.
        let patch = match crate::limits::parse_value("a reported patch", payload) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                let why = "a reported patch must be a JSON object";
                return self.ignore(&device, why, ack, AckCode::Malformed);
            }
            Err(e) => return self.ignore(&device, &e.to_string(), ack, AckCode::Malformed),
        };
        self.stats.reports_received.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let pending = self.reports.entry(device.clone()).or_insert(Reports {
            epoch,
            open: true,
            patches: Vec::new(),
            waiting: 0,
            inflight: 0,
            inflight_epoch: epoch,
            expect: 0,
            since: now,
        });
        if epoch < pending.epoch {
            // From a session already replaced: its connection is closing
            // (dropping the `Ack` says not committed; the device sends it
            // again).
            return;
        }
        if epoch > pending.epoch {
            // A new session: what the old one left is sent again by the
            // device, which got no acknowledgement for it.
            pending.epoch = epoch;
            pending.open = true;
            pending.patches.clear();
            pending.waiting = 0;
            pending.expect = 0;
        }
        pending.waiting += 1;
        // Two patches are composed only while the result stays within the
        // document limit: the state machine refuses a patch over it as a
        // whole, which would lose the other's change too.
        let composed = pending.patches.last_mut().is_some_and(|(last, _)| {
            let before = last.clone();
            if !compose(last, &patch) {
                return false;
            }
            if crate::limits::encoded_len(last) > crate::limits::MAX_DOCUMENT_BYTES {
                *last = before;
                return false;
            }
            true
        });
        if composed {
            if let Some((_, acks)) = pending.patches.last_mut() {
                acks.push(ack);
            }
        } else {
            pending.patches.push((patch, vec![ack]));
        }
        if pending.due(now, self.coalesce) {
            self.flush(&device);
        } else if pending.inflight == 0 {
            self.held.insert(device);
        }
    }

    /// Proposes `device`'s patches (all that are waiting, in order).
    fn flush(&mut self, device: &str) {
        let Some(pending) = self.reports.get_mut(device) else {
            return;
        };
        if pending.inflight > 0 || pending.patches.is_empty() {
            return;
        }
        pending.inflight = std::mem::take(&mut pending.waiting);
        pending.inflight_epoch = pending.epoch;
        let patches = std::mem::take(&mut pending.patches);
        self.stats
            .report_proposals
            .fetch_add(patches.len() as u64, Ordering::Relaxed);
        let (node, logs, patience, name) = (
            self.node.clone(),
            self.logs.clone(),
            self.patience,
            device.to_string(),
        );
        let task = self
            .tasks
            .spawn(propose_reports(node, logs, name.clone(), patches, patience));
        self.flushing.insert(task.id(), name);
    }

    /// An `accepted` message: held for [`ACCEPT_HOLD`], waiting for the
    /// command's result.
    fn hold_accept(&mut self, device: String, cid: String, ack: Ack) {
        let due = Instant::now() + ACCEPT_HOLD;
        match self.accepts.get_mut(&cid) {
            Some(h) if h.device == device => h.acks.push(ack),
            Some(_) => {
                // Another device names the same command: not held (the
                // owner check refuses one of them).
                self.command(
                    device,
                    cid.clone(),
                    Op::CommandAccepted { cid },
                    ack,
                    Vec::new(),
                );
            }
            None => {
                let acks = vec![ack];
                self.accepts.insert(cid, HeldAccept { device, acks, due });
            }
        }
    }

    /// Proposes the patches that waited long enough for the rest of their
    /// device's window, and the `accepted` messages whose result did not
    /// come within [`ACCEPT_HOLD`].
    pub(crate) fn tick(&mut self) {
        let now = Instant::now();
        if !self.accepts.is_empty() {
            let due: Vec<String> = self
                .accepts
                .iter()
                .filter(|(_, h)| h.due <= now)
                .map(|(cid, _)| cid.clone())
                .collect();
            for cid in due {
                let Some(mut h) = self.accepts.remove(&cid) else {
                    continue;
                };
                // A closed connection's messages need no proposal: its
                // device sends them again.
                h.acks.retain(Ack::awaited);
                let mut acks = h.acks.into_iter();
                if let Some(first) = acks.next() {
                    let op = Op::CommandAccepted { cid: cid.clone() };
                    self.command(h.device, cid, op, first, acks.collect());
                }
            }
        }
        let mut due = Vec::new();
        let reports = &self.reports;
        let wait = self.coalesce;
        self.held.retain(|d| match reports.get(d) {
            Some(p) if p.due(now, wait) => {
                due.push(d.clone());
                false
            }
            Some(p) => p.inflight == 0 && p.waiting > 0,
            None => false,
        });
        for device in due {
            self.flush(&device);
        }
    }

    /// A proposal task ended (`None`: there are none).
    pub(crate) fn finished(&mut self, r: Option<Result<(Id, Done), JoinError>>) {
        match r {
            Some(Ok((
                id,
                Done::Reports {
                    device,
                    answers,
                    committed,
                },
            ))) => {
                self.flushing.remove(&id);
                self.reports_done(&device, committed);
                // Only now: the device's next patches come after these.
                for (acks, code) in answers {
                    for a in acks {
                        a.answer(code);
                    }
                }
            }
            Some(Ok((_, Done::Command))) | None => {}
            Some(Err(e)) => {
                if e.is_panic() {
                    tracing::error!(error = %e, "a device message's proposal task panicked");
                }
                if let Some(device) = self.flushing.remove(&e.id()) {
                    self.reports_done(&device, false);
                }
            }
        }
    }

    fn reports_done(&mut self, device: &str, committed: bool) {
        let Some(pending) = self.reports.get_mut(device) else {
            return;
        };
        let now = Instant::now();
        // Its answers are not out yet: what waits came before them.
        let proposed = std::mem::take(&mut pending.inflight);
        if pending.inflight_epoch != pending.epoch {
            // A new session took over meanwhile: what waits is its own.
            pending.expect = 0;
        } else if committed {
            pending.expect = proposed + pending.waiting;
        } else {
            // The device is being disconnected: it sends what was not
            // acknowledged again, in order, when it reconnects.
            pending.patches.clear();
            pending.waiting = 0;
            pending.expect = 0;
        }
        pending.since = now;
        if !pending.open && pending.waiting == 0 {
            self.reports.remove(device);
        } else if pending.due(now, self.coalesce) {
            self.flush(device);
        } else if pending.waiting > 0 {
            self.held.insert(device.to_string());
        }
    }

    /// A session ended: its patches not yet proposed are dropped (their
    /// connection is gone; the device sends them again).
    pub(crate) fn session_ended(&mut self, device: &str, epoch: u64) {
        if let Some(p) = self.reports.get_mut(device)
            && p.epoch == epoch
        {
            p.patches.clear();
            p.waiting = 0;
            p.open = false;
            if p.inflight == 0 {
                self.reports.remove(device);
            }
        }
    }

    /// Proposes a command step for `ack`'s message; `accepted` are the
    /// device's `accepted` messages for the same command that the step (a
    /// result) answers too.
    fn command(&mut self, device: String, cid: String, op: Op, ack: Ack, accepted: Vec<Ack>) {
        let (node, db, stats, logs, patience) = (
            self.node.clone(),
            self.db.clone(),
            self.stats.clone(),
            self.logs.clone(),
            self.patience,
        );
        self.tasks.spawn(async move {
            let ctx = Ctx {
                node: &node,
                logs: &logs,
                patience,
            };
            command_step(ctx, &db, &stats, &device, &cid, op, ack, accepted).await;
            Done::Command
        });
    }
}

/// Proposes one device's patches in order; each message is answered when
/// the patch it is in commits. The first that cannot be committed ends it:
/// that one and the rest are not acknowledged.
async fn propose_reports(
    node: Node<OpResult>,
    logs: Arc<LogLimiter>,
    device: String,
    patches: Vec<(Value, Vec<Ack>)>,
    patience: Duration,
) -> Done {
    let ctx = Ctx {
        node: &node,
        logs: &logs,
        patience,
    };
    let mut answers = Vec::with_capacity(patches.len());
    for (patch, acks) in patches {
        let op = Op::ReportState {
            device: device.clone(),
            patch,
        };
        if let Err(e) = crate::limits::check_op(&op) {
            tracing::warn!(device, "reported-state patch refused: {e}");
            answers.push((acks, AckCode::TooLarge));
            continue;
        }
        match propose(ctx, &device, op, &acks, patience).await {
            Some(r) => answers.push((acks, code_of(&r))),
            None => {
                // These acks and the rest are dropped: not committed.
                return Done::Reports {
                    device,
                    answers,
                    committed: false,
                };
            }
        }
    }
    Done::Reports {
        device,
        answers,
        committed: true,
    }
}

/// What a proposal task needs besides its messages.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    node: &'a Node<OpResult>,
    logs: &'a LogLimiter,
    /// How long one message is tried (see [`patience`]).
    patience: Duration,
}

/// An `accepted` or `result` message: proposed if command `cid` is
/// `device`'s, answered when that commits. `accepted` (the device's
/// `accepted` messages for the command, with a result) are answered with
/// it once it committed; should the result be refused, they are proposed
/// on their own.
#[allow(clippy::too_many_arguments)]
async fn command_step(
    ctx: Ctx<'_>,
    db: &StateDb,
    stats: &MqttStats,
    device: &str,
    cid: &str,
    op: Op,
    ack: Ack,
    accepted: Vec<Ack>,
) {
    let deadline = Instant::now() + ctx.patience;
    let mut backoff = Duration::from_millis(20);
    loop {
        match owner(ctx.node, db, cid).await {
            Ok(Some(owner)) if owner == device => break,
            Ok(_) => {
                ignored(stats, ctx.logs, device, "no such command for this device");
                ack.answer(AckCode::Refused);
                for a in accepted {
                    a.answer(AckCode::Refused);
                }
                return;
            }
            Err(e) => {
                tracing::debug!(device, cid, error = %e, "checking a command for an MQTT message");
                if !ack.awaited() {
                    return;
                }
                if Instant::now() + backoff > deadline {
                    gave_up(ctx, device, op.kind());
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let Some(r) = propose(ctx, device, op, std::slice::from_ref(&ack), left).await else {
        // Not committed: none is acknowledged (the accepted ones are
        // dropped with it, and the device sends them again).
        return;
    };
    let code = code_of(&r);
    ack.answer(code);
    if accepted.is_empty() {
        return;
    }
    if code == AckCode::Success {
        for a in accepted {
            a.answer(AckCode::Success);
        }
        return;
    }
    // The result was refused (too large, say): the device did accept the
    // command, and that must not be lost.
    let op = Op::CommandAccepted {
        cid: cid.to_string(),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if let Some(r) = propose(ctx, device, op, &accepted, left).await {
        let code = code_of(&r);
        for a in accepted {
            a.answer(code);
        }
    }
}

/// Counts an ignored message and logs it (at most once a second).
fn ignored(stats: &MqttStats, logs: &LogLimiter, device: &str, why: &str) {
    stats.ignored_messages.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = logs.allow("ignored") {
        tracing::warn!(device, suppressed, "MQTT message ignored: {why}");
    }
}

/// The device command `cid` belongs to, `None` for no such command: from
/// this gateway's state, and if it is not there, again after a read barrier
/// (it may have been issued through another gateway a moment ago). `Err`
/// when that cannot be told now (no quorum for the barrier).
async fn owner(node: &Node<OpResult>, db: &StateDb, cid: &str) -> Result<Option<String>, String> {
    if let Some(c) = db.command(cid).await.map_err(|e| e.to_string())? {
        return Ok(Some(c.device));
    }
    let index = tokio::time::timeout(BARRIER_TIMEOUT, node.read_index())
        .await
        .map_err(|_| "the read barrier timed out".to_string())?
        .map_err(|e| e.to_string())?;
    node.wait_applied(index, BARRIER_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    Ok(db
        .command(cid)
        .await
        .map_err(|e| e.to_string())?
        .map(|c| c.device))
}

/// How a committed operation's result answers the messages behind it.
fn code_of(r: &OpResult) -> AckCode {
    match r {
        OpResult::NotFound(what) | OpResult::Conflict(what) => {
            tracing::info!("MQTT-originated proposal refused: {what}");
            AckCode::Refused
        }
        OpResult::TooLarge(what) => {
            tracing::warn!("MQTT-originated proposal refused: {what}");
            AckCode::TooLarge
        }
        _ => AckCode::Success,
    }
}

fn gave_up(ctx: Ctx<'_>, device: &str, kind: &str) {
    if let Some(suppressed) = ctx.logs.allow("not-committed") {
        tracing::warn!(
            device,
            kind,
            suppressed,
            "a device message could not be committed within {:?}; not acknowledged \
             (the device is disconnected and sends it again)",
            ctx.patience
        );
    }
}

/// Proposes `op` for the messages `acks`: again after a failure (no
/// leader, a timeout), until it commits (its result), until no connection
/// waits for it any more, or until `patience` has passed (`None`: not
/// committed, which is logged).
async fn propose(
    ctx: Ctx<'_>,
    device: &str,
    op: Op,
    acks: &[Ack],
    patience: Duration,
) -> Option<OpResult> {
    let deadline = Instant::now() + patience;
    let mut backoff = Duration::from_millis(20);
    let kind = op.kind();
    loop {
        let by = format!("device:{device}");
        match crate::shared::propose_as(ctx.node, op.clone(), by).await {
            Ok((_, r)) => return Some(r),
            // Stopping: nothing more is proposed (quietly; a fatal node
            // error is logged once by the node itself).
            Err(e @ (NodeError::Shutdown | NodeError::Fatal(_))) => {
                tracing::debug!(error = %e, kind, "device message abandoned");
                return None;
            }
            Err(e) => tracing::debug!(error = %e, kind, "proposal failed; retrying"),
        }
        if !acks.iter().any(Ack::awaited) {
            // Its device is gone: it sends the message again when it is back.
            return None;
        }
        if Instant::now() + backoff > deadline {
            gave_up(ctx, device, kind);
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Composes merge patch `next` into `acc` so that applying `acc` equals
/// applying both in turn. Returns false (leaving `acc` unchanged) when that
/// cannot be done exactly: `next` merges an object into a key that `acc`
/// replaces with a non-object (or removes).
fn compose(acc: &mut Value, next: &Value) -> bool {
    fn exact(acc: &Map<String, Value>, next: &Map<String, Value>) -> bool {
        next.iter().all(|(k, v)| match (acc.get(k), v) {
            (Some(Value::Object(a)), Value::Object(n)) => exact(a, n),
            (Some(_), Value::Object(_)) => false,
            _ => true,
        })
    }
    fn merge(acc: &mut Map<String, Value>, next: &Map<String, Value>) {
        for (k, v) in next {
            match (acc.get_mut(k), v) {
                (Some(Value::Object(a)), Value::Object(n)) => merge(a, n),
                _ => {
                    acc.insert(k.clone(), v.clone());
                }
            }
        }
    }
    match (acc, next) {
        (Value::Object(a), Value::Object(n)) if exact(a, n) => {
            merge(a, n);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::compose;
    use crate::state::merge::merge_patch;

    #[test]
    fn composed_patches_apply_like_the_sequence() {
        let cases = [
            (json!({"a": 1}), json!({"b": 2})),
            (json!({"a": {"x": 1}}), json!({"a": {"y": null}, "c": null})),
            (json!({"a": null}), json!({"a": 3})),
            (json!({"a": {"x": {"y": 1}}}), json!({"a": {"x": {"z": 2}}})),
        ];
        let base = json!({"a": {"x": 0, "y": 9}, "c": 1});
        for (p1, p2) in cases {
            let mut acc = p1.clone();
            assert!(compose(&mut acc, &p2), "{p1} then {p2}");
            let mut seq = base.clone();
            merge_patch(&mut seq, &p1);
            merge_patch(&mut seq, &p2);
            let mut one = base.clone();
            merge_patch(&mut one, &acc);
            assert_eq!(seq, one, "{p1} then {p2}");
        }
        let mut acc = json!({"a": null});
        assert!(!compose(&mut acc, &json!({"a": {"b": 1}})));
        assert_eq!(acc, json!({"a": null}));
    }
}
