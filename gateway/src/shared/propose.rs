//! The one way an operation enters the log ([`propose`]) and the two ways a
//! failed proposal is tried again.

use std::time::Duration;

use coordinator::node::{Node, NodeError};
use tokio::sync::{oneshot, watch};

use super::now_ms;
use crate::limits;
use crate::ops::{Op, OpResult, Proposal};

/// How many times [`propose_retrying`] tries before giving up (about 35 s
/// with its backoff).
pub const PROPOSAL_ATTEMPTS: u32 = 20;

/// Proposes `op` and waits for its result.
///
/// An operation that fails [`limits::check_op`] is refused without being
/// proposed (`NodeError::Refused`): nothing reaches the log that a member
/// could not decode. Callers with input from outside check first, to
/// answer with the reason.
pub async fn propose(node: &Node<OpResult>, op: Op) -> Result<(u64, OpResult), NodeError> {
    let by = format!("gateway:{}", node.status().raft.id);
    propose_as(node, op, by).await
}

/// [`propose`] on behalf of `by` (the audit trail's [`Proposal::by`]):
/// `token:<id>` for a REST write, `device:<id>` for what a device sent.
/// [`propose`] itself is the gateway's own: `gateway:<node id>`.
pub async fn propose_as(
    node: &Node<OpResult>,
    op: Op,
    by: String,
) -> Result<(u64, OpResult), NodeError> {
    propose_certified(node, op, by)
        .await
        .map(|(index, output, _)| (index, output))
}

/// [`propose_as`] that also returns the write's commit certificate, when
/// the group's engine makes one (PBFT: f+1 members' signed replies; see
/// `consensus::pbft::certificate`).
pub async fn propose_certified(
    node: &Node<OpResult>,
    op: Op,
    by: String,
) -> Result<(u64, OpResult, Option<Vec<u8>>), NodeError> {
    if let Err(e) = limits::check_op(&op) {
        tracing::warn!(kind = op.kind(), "operation refused before proposing: {e}");
        return Err(NodeError::Refused(e.to_string()));
    }
    let p = Proposal {
        ts_ms: now_ms(),
        op,
        by: Some(by),
    };
    let applied = node.propose(p.encode()).await?;
    Ok((applied.index, applied.output, applied.certificate))
}

/// [`propose_certified`] for a caller waiting for the answer (a REST write): tried
/// once more only if it was not placed at all (no leader), as soon as a
/// leader is known — within `leader_wait`, and not past `shutdown`. An
/// outcome that is unknown (a timeout, a dropped entry) is never retried
/// here: the caller says so to whoever asked.
pub async fn propose_placed(
    node: &Node<OpResult>,
    op: Op,
    by: String,
    leader_wait: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Result<(u64, OpResult, Option<Vec<u8>>), NodeError> {
    let r = propose_certified(node, op.clone(), by.clone()).await;
    // Not placed at all: safe to retry once a leader is known (an election
    // usually takes a fraction of a second).
    if matches!(r, Err(NodeError::NoLeader)) && leader_known(node, leader_wait, shutdown).await {
        return propose_certified(node, op, by).await;
    }
    r
}

/// Waits (at most `wait`, and not past shutdown) until this gateway knows a
/// leader; `false` if it still does not (or the node stopped for good).
pub async fn leader_known(
    node: &Node<OpResult>,
    wait: Duration,
    shutdown: &watch::Receiver<bool>,
) -> bool {
    let mut status = node.watch_status();
    let mut shutdown = shutdown.clone();
    let known = async {
        // `wait_for`'s guard must not outlive this expression.
        status
            .wait_for(|s| s.raft.leader.is_some() || s.fatal.is_some())
            .await
            .is_ok_and(|s| s.fatal.is_none())
    };
    tokio::select! {
        r = tokio::time::timeout(wait, known) => r.unwrap_or(false),
        _ = shutdown.wait_for(|s| *s) => false,
    }
}

/// Resolves once a session (or whatever the sender stands for) ended — and
/// again every time it is awaited after that (a oneshot receiver may be
/// awaited only until it completes).
#[derive(Debug)]
pub struct Ended {
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Ended {
    /// Ended once `rx`'s sender sends or is dropped.
    pub fn new(rx: oneshot::Receiver<()>) -> Ended {
        Ended { rx, done: false }
    }

    /// Resolves once it ended.
    pub async fn wait(&mut self) {
        if !self.done {
            // The sender is dropped when the session ends: either way it ended.
            let _ = (&mut self.rx).await;
            self.done = true;
        }
    }
}

/// Proposes `op` until it commits, `PROPOSAL_ATTEMPTS` failures (about
/// 35 s with the backoff), or (between attempts) `stop` resolved. For
/// operations that must not be dropped because an election was running
/// (what the gateway says about its sessions: presence, `sent`): every
/// operation proposed so is idempotent (presence by epoch, command steps by
/// state), so a retry after an unknown outcome is safe.
pub async fn propose_retrying(node: &Node<OpResult>, op: Op, mut stop: Option<&mut Ended>) {
    // Over a limit: refused before proposing, and the answer never changes.
    if let Err(e) = limits::check_op(&op) {
        tracing::warn!(error = %e, kind = op.kind(), "MQTT-originated proposal refused");
        return;
    }
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=PROPOSAL_ATTEMPTS {
        match propose(node, op.clone()).await {
            Ok((_, OpResult::NotFound(what) | OpResult::Conflict(what))) => {
                tracing::info!("MQTT-originated proposal refused: {what}");
                return;
            }
            Ok((_, OpResult::TooLarge(what))) => {
                tracing::warn!("MQTT-originated proposal refused: {what}");
                return;
            }
            Ok(_) => return,
            // Stopping: what is still being proposed is abandoned (quietly;
            // a fatal node error is logged once by the node itself).
            Err(e @ (NodeError::Shutdown | NodeError::Fatal(_))) => {
                tracing::debug!(error = %e, kind = op.kind(), "MQTT-originated proposal abandoned");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, kind = op.kind(), "proposal failed; retrying");
            }
        }
        let stopped = async {
            match stop.as_deref_mut() {
                Some(s) => s.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    tracing::warn!(?op, "giving up on an MQTT-originated proposal");
}
