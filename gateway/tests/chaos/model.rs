//! Sequential specifications of the register-like objects the workload
//! touches, for stateright's `LinearizabilityTester`:
//!
//! - [`ShadowReg`]: a device's desired state as a compare-and-set register.
//!   The workload only writes `{"x": <unique value>}`, so the state is the
//!   shadow version and the last value of `x`. A write with `If-Match` is a
//!   CAS on the version (412 with the current version when it does not
//!   match); every accepted write bumps the version by one.
//! - [`CmdReg`]: one command's lifecycle. Its state also moves without any
//!   client (the gateway sends it, the device accepts and answers, the
//!   leader expires it), at moments the client cannot see. The spec folds
//!   those autonomous transitions into the observations: the state is the
//!   most advanced status linearized so far, and an operation may observe
//!   any status reachable from it in the lifecycle graph (which then becomes
//!   the state). So a read may never go back (`accepted` after `succeeded`,
//!   `queued` after `sent`), a terminal status never changes, a cancel
//!   succeeds only on a command that is not finished, and an issue with an
//!   idempotency key creates at most once.
//! - Device registration uses stateright's own write-once register
//!   (`WORegister`): the value written is a unique label of the
//!   registration request, so a read tells which request created it.

use stateright::semantics::SequentialSpec;

/// A command's status (the gateway's `CommandStatus`, by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    Queued,
    Sent,
    Accepted,
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "sent" => Status::Sent,
            "accepted" => Status::Accepted,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "expired" => Status::Expired,
            "canceled" => Status::Canceled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::Expired | Status::Canceled
        )
    }

    /// Whether the lifecycle can go from `self` to `to` (in zero or more steps):
    /// queued → sent → accepted → succeeded | failed, and any non-terminal
    /// status → expired | canceled.
    pub fn reaches(self, to: Status) -> bool {
        use Status::*;
        if self == to {
            return true;
        }
        match self {
            Queued => true,
            Sent => to != Queued,
            Accepted => !matches!(to, Queued | Sent),
            Succeeded | Failed | Expired | Canceled => false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShadowReg {
    pub version: u64,
    pub value: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowOp {
    /// `PATCH …/shadow` with `{"desired":{"x":value}}`, with `If-Match: expect` if set.
    Write { expect: Option<u64>, value: u64 },
    /// `GET …/shadow` (linearizable).
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowRet {
    /// 200: the version after the write.
    Written { version: u64 },
    /// 412: the version the shadow was at.
    Mismatch { current: u64 },
    /// A read: version and `desired.x`.
    Value { version: u64, value: Option<u64> },
}

impl SequentialSpec for ShadowReg {
    type Op = ShadowOp;
    type Ret = ShadowRet;

    fn invoke(&mut self, op: &ShadowOp) -> ShadowRet {
        match op {
            ShadowOp::Write { expect, value } => {
                if expect.is_some_and(|e| e != self.version) {
                    return ShadowRet::Mismatch {
                        current: self.version,
                    };
                }
                self.version += 1;
                self.value = Some(*value);
                ShadowRet::Written {
                    version: self.version,
                }
            }
            ShadowOp::Read => ShadowRet::Value {
                version: self.version,
                value: self.value,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CmdReg {
    /// Not issued (yet).
    #[default]
    Absent,
    /// Issued; the most advanced status linearized so far.
    Is(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdOp {
    /// `POST /v1/devices/{id}/commands` (the same request again, with the
    /// same idempotency key, is the same object).
    Issue,
    /// `GET /v1/commands/{cid}` (linearizable; also the status a `?wait`
    /// answer reports, and the final state read from the databases).
    Read,
    /// `POST /v1/commands/{cid}/cancel`.
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdRet {
    /// 201.
    Created,
    /// 200 for a repeated idempotency key, with the status it reported
    /// (`None` when the answer came after a `?wait`: that status is recorded
    /// as a read of its own).
    Existing(Option<Status>),
    Found(Status),
    NotFound,
    /// Cancel: 200.
    Canceled,
    /// Cancel: 409, already finished (with the status the problem names, if
    /// it could be read).
    Finished(Option<Status>),
}

impl SequentialSpec for CmdReg {
    type Op = CmdOp;
    type Ret = CmdRet;

    /// The deterministic outcome, used for operations whose answer never
    /// came (the tester may place them anywhere after their invocation, or
    /// nowhere).
    fn invoke(&mut self, op: &CmdOp) -> CmdRet {
        match (*self, op) {
            (CmdReg::Absent, CmdOp::Issue) => {
                *self = CmdReg::Is(Status::Queued);
                CmdRet::Created
            }
            (CmdReg::Is(s), CmdOp::Issue) => CmdRet::Existing(Some(s)),
            (CmdReg::Absent, _) => CmdRet::NotFound,
            (CmdReg::Is(s), CmdOp::Read) => CmdRet::Found(s),
            (CmdReg::Is(s), CmdOp::Cancel) => {
                if !s.is_terminal() || s == Status::Canceled {
                    *self = CmdReg::Is(Status::Canceled);
                    CmdRet::Canceled
                } else {
                    CmdRet::Finished(Some(s))
                }
            }
        }
    }

    fn is_valid_step(&mut self, op: &CmdOp, ret: &CmdRet) -> bool {
        match (*self, op, ret) {
            (CmdReg::Absent, CmdOp::Issue, CmdRet::Created) => {
                *self = CmdReg::Is(Status::Queued);
                true
            }
            (CmdReg::Is(_), CmdOp::Issue, CmdRet::Existing(None)) => true,
            (
                CmdReg::Is(s),
                CmdOp::Issue | CmdOp::Read,
                CmdRet::Existing(Some(t)) | CmdRet::Found(t),
            ) if s.reaches(*t) => {
                *self = CmdReg::Is(*t);
                true
            }
            (CmdReg::Absent, CmdOp::Read | CmdOp::Cancel, CmdRet::NotFound) => true,
            (CmdReg::Is(s), CmdOp::Cancel, CmdRet::Canceled)
                if !s.is_terminal() || s == Status::Canceled =>
            {
                *self = CmdReg::Is(Status::Canceled);
                true
            }
            (CmdReg::Is(s), CmdOp::Cancel, CmdRet::Finished(Some(t)))
                if t.is_terminal() && *t != Status::Canceled && s.reaches(*t) =>
            {
                *self = CmdReg::Is(*t);
                true
            }
            (CmdReg::Is(s), CmdOp::Cancel, CmdRet::Finished(None)) => {
                // Some finished status other than canceled must be reachable;
                // the state stays a lower bound.
                [Status::Succeeded, Status::Failed, Status::Expired]
                    .iter()
                    .any(|t| s.reaches(*t))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

    #[test]
    fn cas_register_catches_a_stale_read() {
        let mut t = LinearizabilityTester::new(ShadowReg::default());
        t.on_invret(
            0u64,
            ShadowOp::Write {
                expect: Some(0),
                value: 7,
            },
            ShadowRet::Written { version: 1 },
        )
        .expect("valid")
        .on_invret(
            1,
            ShadowOp::Read,
            ShadowRet::Value {
                version: 0,
                value: None,
            },
        )
        .expect("valid");
        assert!(!t.is_consistent());
    }

    #[test]
    fn command_status_never_goes_back() {
        let mut t = LinearizabilityTester::new(CmdReg::default());
        t.on_invret(0u64, CmdOp::Issue, CmdRet::Created)
            .expect("valid")
            .on_invret(1, CmdOp::Read, CmdRet::Found(Status::Succeeded))
            .expect("valid");
        assert!(t.is_consistent());
        t.on_invret(2, CmdOp::Cancel, CmdRet::Canceled)
            .expect("valid");
        assert!(!t.is_consistent());
    }

    #[test]
    fn an_unanswered_cancel_may_or_may_not_have_happened() {
        let mut t = LinearizabilityTester::new(CmdReg::default());
        t.on_invret(0u64, CmdOp::Issue, CmdRet::Created)
            .expect("valid")
            .on_invoke(1, CmdOp::Cancel)
            .expect("valid")
            .on_invret(2, CmdOp::Read, CmdRet::Found(Status::Accepted))
            .expect("valid")
            .on_invret(2, CmdOp::Read, CmdRet::Found(Status::Canceled))
            .expect("valid");
        assert!(t.is_consistent());
    }
}
