//! Tests of the state machine: every operation, exactly-once apply,
//! determinism, snapshots, events.

use std::collections::BTreeMap;
use std::sync::Arc;

use coordinator::node::Committed;
use coordinator::raft::{ConfState, SnapshotMeta};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::*;
use crate::ops::{Command, CommandStatus, Device, DeviceRegistration, Op, Proposal, Role, Shadow};

const T0: u64 = 1_764_144_000_000;

/// Who the test entries say made them.
const BY: &str = "token:tok-test";

fn entry(index: u64, ts_ms: u64, op: Op) -> Committed {
    Committed {
        index,
        term: 1,
        data: Proposal {
            ts_ms,
            op,
            by: Some(BY.into()),
        }
        .encode()
        .into(),
    }
}

/// A database in a temp dir, fed one entry at a time.
struct Db {
    dir: TempDir,
    db: StateDb,
    next: u64,
}

impl Db {
    async fn new() -> Db {
        let dir = TempDir::new().unwrap();
        let db = StateDb::open(dir.path()).await.unwrap();
        Db { dir, db, next: 1 }
    }

    /// Applies `op` at the next index, stamped `T0 + index`.
    async fn run(&mut self, op: Op) -> OpResult {
        let ts = T0 + self.next;
        self.run_at(ts, op).await
    }

    async fn run_at(&mut self, ts: u64, op: Op) -> OpResult {
        let i = self.next;
        self.next += 1;
        let mut r = self.db.apply(vec![entry(i, ts, op)], i).await.unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(self.db.applied_index(), i);
        r.remove(0)
    }
}

fn register(id: &str) -> Op {
    register_with(id, &[])
}

fn register_with(id: &str, labels: &[(&str, &str)]) -> Op {
    Op::RegisterDevice {
        id: id.into(),
        secret_hash: format!("hash-{id}"),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        attributes: json!({"model": "X2"}),
        cert_sha256: None,
    }
}

fn issue(cid: &str, device: &str, ttl_ms: u64, key: Option<&str>) -> Op {
    Op::IssueCommand {
        cid: cid.into(),
        device: device.into(),
        name: "reboot".into(),
        params: json!({"delay_s": 5}),
        ttl_ms,
        idempotency_key: key.map(String::from),
    }
}

fn set_desired(device: &str, patch: Value, expected: Option<u64>) -> Op {
    Op::SetDesired {
        device: device.into(),
        patch,
        expected_version: expected,
    }
}

fn report(device: &str, patch: Value) -> Op {
    Op::ReportState {
        device: device.into(),
        patch,
    }
}

fn presence(device: &str, gateway: u64, epoch: u64, online: bool) -> Op {
    Op::Presence {
        device: device.into(),
        gateway,
        epoch,
        online,
    }
}

fn page(limit: u32) -> Page {
    Page { after: None, limit }
}

fn command_of(r: OpResult) -> (Command, bool) {
    match r {
        OpResult::Command { command, created } => (command, created),
        other => panic!("expected a command, got {other:?}"),
    }
}

fn shadow_of(r: OpResult) -> Shadow {
    match r {
        OpResult::Shadow(s) => s,
        other => panic!("expected a shadow, got {other:?}"),
    }
}

/// A registration with a certificate fingerprint.
fn with_cert(op: Op, fingerprint: &str) -> Op {
    match op {
        Op::RegisterDevice {
            id,
            secret_hash,
            labels,
            attributes,
            ..
        } => Op::RegisterDevice {
            id,
            secret_hash,
            labels,
            attributes,
            cert_sha256: Some(fingerprint.into()),
        },
        other => other,
    }
}

fn device_of(r: OpResult) -> Device {
    match r {
        OpResult::Device(d) => d,
        other => panic!("expected a device, got {other:?}"),
    }
}

async fn status_of(db: &StateDb, cid: &str) -> CommandStatus {
    db.command(cid).await.unwrap().unwrap().status
}

/// Everything the queries can see, as one JSON document.
async fn dump(db: &StateDb) -> String {
    let devices = db
        .list_devices(&DeviceFilter::default(), &page(u32::MAX))
        .await
        .unwrap();
    let mut per_device = Vec::new();
    for d in &devices {
        let shadow = db.shadow(&d.id).await.unwrap();
        let commands = db
            .list_commands(&d.id, None, &page(u32::MAX))
            .await
            .unwrap();
        let secret = db.device_secret_hash(&d.id).await.unwrap();
        per_device
            .push(json!({"device": d, "shadow": shadow, "commands": commands, "secret": secret}));
    }
    let events = db.events_since(0, u32::MAX).await.unwrap();
    let counts: Vec<(String, u64)> = db
        .command_counts()
        .await
        .unwrap()
        .into_iter()
        .map(|(s, n)| (s.as_str().to_string(), n))
        .collect();
    let mut tokens = BTreeMap::new();
    for h in ["t-admin", "t-op", "t-view", "t-v0", "t-admin2"] {
        tokens.insert(h, db.token_role(h).await.unwrap());
    }
    serde_json::to_string_pretty(&json!({
        "applied": db.applied_index(),
        "devices": per_device,
        "events": events,
        "counts": counts,
        "tokens": tokens,
        "token_list": db.list_tokens().await.unwrap(),
        "has_tokens": db.has_tokens().await.unwrap(),
        "expired": db.expired_commands(u64::MAX / 2, 1000).await.unwrap(),
    }))
    .unwrap()
}

/// A mixed workload touching every operation.
fn workload() -> Vec<Committed> {
    let ops = vec![
        Op::BootstrapAdmin {
            token_hash: "t-admin".into(),
        },
        Op::CreateToken {
            token_hash: "t-op".into(),
            role: Role::Operator,
            name: "ops".into(),
            id: Some("tok-op".into()),
            expires_at: None,
        },
        register_with("pump-1", &[("site", "north")]),
        register_with("pump-2", &[("site", "south")]),
        with_cert(register("valve-9"), &"ab".repeat(32)),
        Op::UpdateDevice {
            id: "pump-2".into(),
            labels: Some(BTreeMap::from([("site".into(), "north".into())])),
            attributes: None,
            cert_sha256: Some(Some("cd".repeat(32))),
        },
        Op::RotateSecret {
            id: "pump-1".into(),
            secret_hash: "new".into(),
        },
        issue("c-1", "pump-1", 60_000, Some("k1")),
        issue("c-2", "pump-1", 10, None),
        issue("c-3", "pump-2", 60_000, None),
        issue("c-1b", "pump-1", 60_000, Some("k1")),
        Op::CommandSent {
            cid: "c-1".into(),
            gateway: 1,
        },
        Op::CommandAccepted { cid: "c-1".into() },
        Op::CommandResult {
            cid: "c-1".into(),
            succeeded: true,
            output: json!({"ok": true}),
        },
        Op::CancelCommand { cid: "c-3".into() },
        Op::ExpireCommands {
            cids: vec!["c-2".into(), "c-3".into()],
        },
        set_desired("pump-1", json!({"speed": 3, "led": {"on": true}}), None),
        report("pump-1", json!({"speed": 2, "led": {"on": true}})),
        set_desired("pump-1", json!({"speed": null}), Some(1)),
        presence("pump-1", 1, 1, true),
        presence("pump-2", 2, 1, true),
        presence("pump-2", 2, 1, false),
        presence("valve-9", 2, 4, true),
        Op::GatewaySessionsLost { gateway: 2 },
        Op::DeleteDevice {
            id: "pump-2".into(),
        },
        // Tokens last, so the indexes above stay as the tests name them.
        Op::CreateToken {
            token_hash: "t-v0".into(),
            role: Role::Viewer,
            name: "dash".into(),
            id: Some("tok-v".into()),
            expires_at: Some(T0 + 1_000_000),
        },
        Op::RotateToken {
            id: "tok-v".into(),
            token_hash: "t-view".into(),
        },
        Op::TokensUsed {
            uses: BTreeMap::from([("tok-v".into(), T0 + 5), ("gone".into(), T0)]),
        },
        Op::RevokeToken {
            id: "bootstrap".into(),
        },
        Op::CreateToken {
            token_hash: "t-admin2".into(),
            role: Role::Admin,
            name: "second admin".into(),
            id: None,
            expires_at: None,
        },
        Op::RevokeToken {
            id: "bootstrap".into(),
        },
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| {
            let index = i as u64 + 1;
            entry(index, T0 + index * 100, op)
        })
        .collect()
}

// ---------------------------------------------------------------- tokens

#[tokio::test]
async fn fresh_database_is_empty() {
    let t = Db::new().await;
    assert_eq!(t.db.applied_index(), 0);
    assert!(!t.db.has_tokens().await.unwrap());
    assert!(t.db.device("x").await.unwrap().is_none());
    assert!(t.db.events_since(0, 10).await.unwrap().is_empty());
    let counts = t.db.command_counts().await.unwrap();
    assert_eq!(counts.len(), CommandStatus::ALL.len());
    assert!(counts.iter().all(|(_, n)| *n == 0));
    assert!(t.dir.path().join("state.db").exists());
}

#[tokio::test]
async fn bootstrap_and_tokens() {
    let mut t = Db::new().await;
    let boot = Op::BootstrapAdmin {
        token_hash: "t-admin".into(),
    };
    assert_eq!(t.run(boot.clone()).await, OpResult::Done);
    assert!(t.db.has_tokens().await.unwrap());
    assert_eq!(t.db.token_role("t-admin").await.unwrap(), Some(Role::Admin));
    // A second bootstrap (from another gateway) changes nothing.
    let boot2 = Op::BootstrapAdmin {
        token_hash: "t-other".into(),
    };
    assert_eq!(t.run(boot2).await, OpResult::Ignored);
    assert_eq!(t.db.token_role("t-other").await.unwrap(), None);

    let create = Op::CreateToken {
        token_hash: "t-view".into(),
        role: Role::Viewer,
        name: "dashboard".into(),
        id: Some("tok-view".into()),
        expires_at: None,
    };
    assert!(matches!(t.run(create.clone()).await, OpResult::Token(_)));
    assert_eq!(t.db.token_role("t-view").await.unwrap(), Some(Role::Viewer));
    assert!(matches!(t.run(create).await, OpResult::Conflict(_)));
    assert_eq!(t.db.token_role("nope").await.unwrap(), None);

    // Token events never carry the hash; they carry who made them.
    let events = t.db.events_since(0, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, "token");
    assert_eq!(
        events[1].data,
        json!({"id": "tok-view", "role": "viewer", "name": "dashboard", "expires_at": null})
    );
    assert_eq!(events[1].by.as_deref(), Some(BY));
    assert!(!events[0].data.to_string().contains("t-admin"));
}

#[tokio::test]
async fn tokens_have_ids_expire_rotate_and_the_last_admin_stays() {
    let mut t = Db::new().await;
    let create = |hash: &str, role, id: Option<&str>, expires_at| Op::CreateToken {
        token_hash: hash.into(),
        role,
        name: "label".into(),
        id: id.map(Into::into),
        expires_at,
    };
    t.run(Op::BootstrapAdmin {
        token_hash: "h-boot".into(),
    })
    .await;
    let boot = t.db.token("h-boot").await.unwrap().unwrap();
    assert_eq!((boot.id.as_str(), boot.role), ("bootstrap", Role::Admin));
    // The only admin token without an expiry cannot be revoked, not even
    // with another admin token that expires.
    let r = t
        .run(create("h-exp", Role::Admin, Some("tok-exp"), Some(T0 + 10)))
        .await;
    assert!(
        matches!(r, OpResult::Token(ref i) if i.expires_at == Some(T0 + 10)),
        "{r:?}"
    );
    assert_eq!(
        t.db.token("h-exp").await.unwrap().unwrap().expires_at,
        Some(T0 + 10)
    );
    let last = t
        .run(Op::RevokeToken {
            id: "bootstrap".into(),
        })
        .await;
    assert!(
        matches!(last, OpResult::Conflict(ref m) if m.contains("last admin")),
        "{last:?}"
    );
    assert!(t.db.token("h-boot").await.unwrap().is_some());
    // An id taken, an id unknown.
    let dup = t
        .run(create("h-other", Role::Viewer, Some("tok-exp"), None))
        .await;
    assert!(matches!(dup, OpResult::Conflict(_)), "{dup:?}");
    for op in [
        Op::RevokeToken { id: "nope".into() },
        Op::RotateToken {
            id: "nope".into(),
            token_hash: "h-x".into(),
        },
    ] {
        assert!(matches!(t.run(op).await, OpResult::NotFound(_)));
    }
    // Rotating: the old hash stops working, the id stays; a hash in use
    // is refused.
    let taken = Op::RotateToken {
        id: "bootstrap".into(),
        token_hash: "h-exp".into(),
    };
    assert!(matches!(t.run(taken).await, OpResult::Conflict(_)));
    let rotate = Op::RotateToken {
        id: "bootstrap".into(),
        token_hash: "h-boot2".into(),
    };
    assert_eq!(t.run(rotate).await, OpResult::Done);
    assert!(t.db.token("h-boot").await.unwrap().is_none());
    assert_eq!(
        t.db.token("h-boot2").await.unwrap().unwrap().id,
        "bootstrap"
    );
    // With a second admin token that does not expire, the first may go.
    t.run(create("h-a2", Role::Admin, Some("tok-a2"), None))
        .await;
    assert_eq!(
        t.run(Op::RevokeToken {
            id: "bootstrap".into()
        })
        .await,
        OpResult::Done
    );
    assert!(t.db.token("h-boot2").await.unwrap().is_none());
    let last = t
        .run(Op::RevokeToken {
            id: "tok-a2".into(),
        })
        .await;
    assert!(matches!(last, OpResult::Conflict(_)), "{last:?}");
    // Last use: the later of the two, unknown ids skipped, no event.
    let before = t.db.events_since(0, 100).await.unwrap().len();
    for at in [T0 + 50, T0 + 20] {
        let uses = BTreeMap::from([("tok-a2".to_string(), at), ("gone".to_string(), at)]);
        assert_eq!(t.run(Op::TokensUsed { uses }).await, OpResult::Done);
    }
    assert_eq!(t.db.events_since(0, 100).await.unwrap().len(), before);
    // A token created by an entry without an id (an earlier version's).
    t.run_at(T0 + 7, create("h-old", Role::Viewer, None, None))
        .await;
    t.run_at(T0 + 7, create("h-old2", Role::Viewer, None, None))
        .await;
    let list = t.db.list_tokens().await.unwrap();
    let ids: Vec<&str> = list.iter().map(|i| i.id.as_str()).collect();
    let expected: Vec<String> = vec![
        format!("t{}", T0 + 7),
        format!("t{}-1", T0 + 7),
        "tok-a2".into(),
        "tok-exp".into(),
    ];
    assert_eq!(ids, expected);
    let a2 = list.iter().find(|i| i.id == "tok-a2").unwrap();
    assert_eq!(a2.last_used, Some(T0 + 50));
    assert_eq!(a2.role, Role::Admin);
    // The listing never holds a hash.
    let text = serde_json::to_string(&list).unwrap();
    assert!(!text.contains("h-"), "{text}");
    // Events: created, rotated, revoked — each naming who did it.
    let events = t.db.events_since(0, 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"token.rotated") && kinds.contains(&"token.revoked"),
        "{kinds:?}"
    );
    assert!(events.iter().all(|e| e.by.as_deref() == Some(BY)));
    assert!(!serde_json::to_string(&events).unwrap().contains("h-"));
}

/// Migration 0004 names the tokens an earlier version created as applying
/// their entries names them now: the first admin token `bootstrap`, any
/// other `t<created_at>` (`-<n>` after a second of the same millisecond).
#[test]
fn migration_0004_names_existing_tokens_as_apply_does() {
    let c = rusqlite::Connection::open_in_memory().unwrap();
    c.execute_batch(
        "CREATE TABLE tokens (token_hash TEXT PRIMARY KEY NOT NULL, role TEXT NOT NULL, \
         name TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID; \
         CREATE TABLE events (idx INTEGER PRIMARY KEY NOT NULL, kind TEXT NOT NULL, \
         data TEXT NOT NULL); \
         INSERT INTO tokens VALUES ('b', 'admin', 'bootstrap admin', 10); \
         INSERT INTO tokens VALUES ('x', 'viewer', 'dash', 20); \
         INSERT INTO tokens VALUES ('y', 'operator', 'ops', 20); \
         INSERT INTO tokens VALUES ('z', 'admin', 'bootstrap admin', 30);",
    )
    .unwrap();
    c.execute_batch(include_str!("../../../migrations/0004_token_ids.sql"))
        .unwrap();
    let mut q = c
        .prepare("SELECT token_hash, id FROM tokens ORDER BY token_hash")
        .unwrap();
    let ids: Vec<(String, String)> = q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let want = [
        ("b", "bootstrap"),
        ("x", "t20"),
        ("y", "t20-1"),
        ("z", "t30"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(ids, want);
}

// ---------------------------------------------------------------- devices

#[tokio::test]
async fn device_register_update_rotate_delete() {
    let mut t = Db::new().await;
    let d = device_of(t.run(register_with("pump-7", &[("site", "north")])).await);
    assert_eq!(d.id, "pump-7");
    assert_eq!(d.labels.get("site").map(String::as_str), Some("north"));
    assert_eq!(d.attributes, json!({"model": "X2"}));
    assert!(!d.online);
    assert_eq!(d.gateway, None);
    assert_eq!(d.created_at, T0 + 1);
    assert_eq!(d.updated_at, T0 + 1);
    assert_eq!(t.db.device("pump-7").await.unwrap(), Some(d.clone()));
    assert_eq!(
        t.db.device_secret_hash("pump-7").await.unwrap().as_deref(),
        Some("hash-pump-7")
    );

    // A new device has an empty shadow at version 0.
    let sh = t.db.shadow("pump-7").await.unwrap().unwrap();
    assert_eq!(sh.desired, json!({}));
    assert_eq!(sh.reported, json!({}));
    assert_eq!(sh.delta, json!({}));
    assert_eq!(sh.version, 0);
    assert!(sh.desired_updated.is_empty() && sh.reported_updated.is_empty());

    assert!(matches!(
        t.run(register("pump-7")).await,
        OpResult::Conflict(m) if m.contains("pump-7")
    ));

    // Update: only the given fields change.
    let u = device_of(
        t.run(Op::UpdateDevice {
            id: "pump-7".into(),
            labels: None,
            attributes: Some(json!({"model": "X3"})),
            cert_sha256: None,
        })
        .await,
    );
    assert_eq!(u.labels, d.labels);
    assert_eq!(u.attributes, json!({"model": "X3"}));
    assert_eq!(u.created_at, d.created_at);
    assert_eq!(u.updated_at, T0 + 3);
    let u = device_of(
        t.run(Op::UpdateDevice {
            id: "pump-7".into(),
            labels: Some(BTreeMap::from([("zone".into(), "a".into())])),
            attributes: None,
            cert_sha256: None,
        })
        .await,
    );
    assert_eq!(u.attributes, json!({"model": "X3"}));
    assert_eq!(u.labels, BTreeMap::from([("zone".into(), "a".into())]));
    // The label index follows.
    let f = DeviceFilter {
        label: Some(("site".into(), "north".into())),
        online: None,
    };
    assert!(t.db.list_devices(&f, &page(10)).await.unwrap().is_empty());
    let f = DeviceFilter {
        label: Some(("zone".into(), "a".into())),
        online: None,
    };
    assert_eq!(t.db.list_devices(&f, &page(10)).await.unwrap().len(), 1);
    assert!(matches!(
        t.run(Op::UpdateDevice {
            id: "ghost".into(),
            labels: None,
            attributes: None,
            cert_sha256: None,
        })
        .await,
        OpResult::NotFound(_)
    ));

    // Rotate.
    let r = device_of(
        t.run(Op::RotateSecret {
            id: "pump-7".into(),
            secret_hash: "new-hash".into(),
        })
        .await,
    );
    assert_eq!(r.id, "pump-7");
    assert_eq!(
        t.db.device_secret_hash("pump-7").await.unwrap().as_deref(),
        Some("new-hash")
    );
    assert!(matches!(
        t.run(Op::RotateSecret {
            id: "ghost".into(),
            secret_hash: "x".into()
        })
        .await,
        OpResult::NotFound(_)
    ));

    // Delete takes the shadow, commands and idempotency keys with it.
    t.run(issue("c-1", "pump-7", 1000, Some("key"))).await;
    assert_eq!(
        t.run(Op::DeleteDevice {
            id: "pump-7".into()
        })
        .await,
        OpResult::Done
    );
    assert!(t.db.device("pump-7").await.unwrap().is_none());
    assert!(t.db.shadow("pump-7").await.unwrap().is_none());
    assert!(t.db.command("c-1").await.unwrap().is_none());
    assert!(t.db.device_secret_hash("pump-7").await.unwrap().is_none());
    assert!(t.db.list_devices(&f, &page(10)).await.unwrap().is_empty());
    assert!(matches!(
        t.run(Op::DeleteDevice {
            id: "pump-7".into()
        })
        .await,
        OpResult::NotFound(_)
    ));
    let last = t.db.events_since(0, 100).await.unwrap();
    let del = last.iter().find(|e| e.kind == "device.deleted").unwrap();
    assert_eq!(del.data, json!({"id": "pump-7"}));

    // Re-registered, the old key is free again.
    device_of(t.run(register("pump-7")).await);
    let (c, created) = command_of(t.run(issue("c-2", "pump-7", 1000, Some("key"))).await);
    assert!(created);
    assert_eq!(c.id, "c-2");
    let sh = t.db.shadow("pump-7").await.unwrap().unwrap();
    assert_eq!(sh.version, 0);
}

#[tokio::test]
async fn device_certificates_are_registered_changed_and_unique() {
    let mut t = Db::new().await;
    let (a, b) = ("aa".repeat(32), "bb".repeat(32));
    let d = device_of(t.run(with_cert(register("cam-1"), &a)).await);
    assert_eq!(d.cert_sha256.as_deref(), Some(a.as_str()));
    let creds = t.db.device_credentials("cam-1").await.unwrap().unwrap();
    assert_eq!(creds.cert_sha256.as_deref(), Some(a.as_str()));
    assert_eq!(creds.secret_hash, "hash-cam-1");
    assert_eq!(t.db.device_credentials("ghost").await.unwrap(), None);
    // One certificate, one device: registering or updating another device
    // with it is a conflict that changes nothing.
    let r = t.run(with_cert(register("cam-2"), &a)).await;
    assert!(
        matches!(&r, OpResult::Conflict(m) if m.contains("cam-1")),
        "{r:?}"
    );
    assert!(t.db.device("cam-2").await.unwrap().is_none());
    device_of(t.run(with_cert(register("cam-2"), &b)).await);
    let update = |cert: Option<Option<String>>| Op::UpdateDevice {
        id: "cam-2".into(),
        labels: None,
        attributes: None,
        cert_sha256: cert,
    };
    assert!(matches!(
        t.run(update(Some(Some(a.clone())))).await,
        OpResult::Conflict(_)
    ));
    assert_eq!(
        t.db.device("cam-2").await.unwrap().unwrap().cert_sha256,
        Some(b.clone())
    );
    // Its own fingerprint again is no conflict; no change leaves it; null
    // removes it (and frees it for another device).
    device_of(t.run(update(Some(Some(b.clone())))).await);
    let kept = device_of(t.run(update(None)).await);
    assert_eq!(kept.cert_sha256, Some(b.clone()));
    let removed = device_of(t.run(update(Some(None))).await);
    assert_eq!(removed.cert_sha256, None);
    let events = t.db.events_since(0, 100).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, "device.updated");
    assert_eq!(last.data["cert_sha256"], Value::Null);
    device_of(t.run(with_cert(register("cam-3"), &b)).await);
    // A device with no secret (certificate only) stores an empty hash.
    let mut cert_only = with_cert(register("cam-4"), &"cc".repeat(32));
    if let Op::RegisterDevice { secret_hash, .. } = &mut cert_only {
        secret_hash.clear();
    }
    device_of(t.run(cert_only).await);
    let creds = t.db.device_credentials("cam-4").await.unwrap().unwrap();
    assert_eq!(creds.secret_hash, "");
}

async fn device_count(db: &StateDb) -> usize {
    db.list_devices(&DeviceFilter::default(), &page(u32::MAX))
        .await
        .unwrap()
        .len()
}

/// One device of a batch registration.
fn batch_device(id: &str, cert: Option<&str>) -> DeviceRegistration {
    DeviceRegistration {
        id: id.into(),
        secret_hash: format!("hash-{id}"),
        labels: BTreeMap::from([("site".to_string(), "north".to_string())]),
        attributes: json!({"model": "X2"}),
        cert_sha256: cert.map(String::from),
    }
}

/// A batch registration registers every device in one entry, with one
/// event of the entry's index naming them in order; a conflict of any one
/// (id registered, fingerprint another device's, either twice in the
/// entry) registers none and makes no event — deterministically, never a
/// database error that would stop the member.
#[tokio::test]
async fn a_batch_registers_all_or_none() {
    let mut t = Db::new().await;
    let (a, b) = ("aa".repeat(32), "bb".repeat(32));
    device_of(t.run(with_cert(register("taken"), &a)).await);
    let before = t.db.events_since(0, 100).await.unwrap().len();
    let batch = |devices: Vec<DeviceRegistration>| Op::RegisterDevices { devices };
    for (devices, conflicting) in [
        (
            vec![batch_device("n1", None), batch_device("taken", None)],
            vec![("taken", "already registered")],
        ),
        (
            vec![batch_device("n1", None), batch_device("n2", Some(&a))],
            vec![("n2", "device taken's")],
        ),
        (
            vec![batch_device("n1", None), batch_device("n1", None)],
            vec![("n1", "twice")],
        ),
        (
            vec![batch_device("n1", Some(&b)), batch_device("n2", Some(&b))],
            vec![("n2", "another device's of the batch")],
        ),
    ] {
        let r = t.run(batch(devices)).await;
        let OpResult::BatchConflict { conflicts, total } = &r else {
            panic!("expected a batch conflict, got {r:?}");
        };
        assert_eq!(*total, conflicting.len(), "{r:?}");
        for ((id, why), (want_id, says)) in conflicts.iter().zip(&conflicting) {
            assert_eq!(id, want_id, "{r:?}");
            assert!(why.contains(says), "{r:?}");
        }
        assert_eq!(device_count(&t.db).await, 1, "nothing registered: {r:?}");
        assert!(t.db.shadow("n1").await.unwrap().is_none());
        assert_eq!(t.db.events_since(0, 100).await.unwrap().len(), before);
    }
    // Conflicts are counted in full, listed up to the bound.
    let many: Vec<DeviceRegistration> = (0..=crate::ops::MAX_CONFLICTS_LISTED)
        .map(|_| batch_device("taken", None))
        .collect();
    let r = t.run(batch(many)).await;
    assert!(
        matches!(&r, OpResult::BatchConflict { conflicts, total }
            if conflicts.len() == crate::ops::MAX_CONFLICTS_LISTED
                && *total == crate::ops::MAX_CONFLICTS_LISTED + 1),
        "{r:?}"
    );

    // None conflicting: all registered at the entry's time, with shadows
    // and labels, and one event at the entry's index (more devices than the
    // API puts in one request).
    let n = 1100;
    let index = t.next;
    let devices: Vec<DeviceRegistration> = (0..n)
        .map(|i| batch_device(&format!("b-{i:04}"), (i == 7).then_some(b.as_str())))
        .collect();
    assert_eq!(t.run(batch(devices)).await, OpResult::Done);
    assert_eq!(device_count(&t.db).await, 1101);
    let d = t.db.device("b-0007").await.unwrap().unwrap();
    assert_eq!(d.cert_sha256.as_deref(), Some(b.as_str()));
    assert_eq!(d.created_at, T0 + index);
    assert_eq!(d.labels["site"], "north");
    assert_eq!(
        t.db.device_credentials("b-1099")
            .await
            .unwrap()
            .unwrap()
            .secret_hash,
        "hash-b-1099"
    );
    assert!(t.db.shadow("b-0750").await.unwrap().is_some());
    let north = DeviceFilter {
        label: Some(("site".into(), "north".into())),
        online: None,
    };
    assert_eq!(
        t.db.list_devices(&north, &page(2000)).await.unwrap().len(),
        1100
    );
    let events = t.db.events_since(index - 1, 100).await.unwrap();
    assert_eq!(events.len(), 1, "one entry, one event");
    assert_eq!(events[0].index, index);
    assert_eq!(events[0].kind, "devices.registered");
    let ids = events[0].data["devices"].as_array().unwrap();
    assert_eq!(ids.len(), 1100);
    assert_eq!(
        (ids[0].as_str(), ids[1099].as_str()),
        (Some("b-0000"), Some("b-1099"))
    );
}

#[tokio::test]
async fn list_devices_pages_and_filters() {
    let mut t = Db::new().await;
    for i in 0..25 {
        let site = if i % 2 == 0 { "north" } else { "south" };
        t.run(register_with(&format!("dev-{i:02}"), &[("site", site)]))
            .await;
    }
    for i in [0, 3, 4, 10] {
        t.run(presence(&format!("dev-{i:02}"), 1, 1, true)).await;
    }
    // Pages of 10 cover everything once, in id order.
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let p = Page {
            after: after.clone(),
            limit: 10,
        };
        let got =
            t.db.list_devices(&DeviceFilter::default(), &p)
                .await
                .unwrap();
        if got.is_empty() {
            break;
        }
        assert!(got.len() <= 10);
        after = got.last().map(|d| d.id.clone());
        all.extend(got.into_iter().map(|d| d.id));
    }
    let want: Vec<String> = (0..25).map(|i| format!("dev-{i:02}")).collect();
    assert_eq!(all, want);

    let north = DeviceFilter {
        label: Some(("site".into(), "north".into())),
        online: None,
    };
    let got = t.db.list_devices(&north, &page(100)).await.unwrap();
    assert_eq!(got.len(), 13);
    let online = DeviceFilter {
        label: None,
        online: Some(true),
    };
    let ids: Vec<String> =
        t.db.list_devices(&online, &page(100))
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
    assert_eq!(ids, ["dev-00", "dev-03", "dev-04", "dev-10"]);
    let both = DeviceFilter {
        label: Some(("site".into(), "north".into())),
        online: Some(true),
    };
    let p = Page {
        after: Some("dev-00".into()),
        limit: 1,
    };
    let ids: Vec<String> =
        t.db.list_devices(&both, &p)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
    assert_eq!(ids, ["dev-04"]);
    let offline = DeviceFilter {
        label: None,
        online: Some(false),
    };
    assert_eq!(
        t.db.list_devices(&offline, &page(100)).await.unwrap().len(),
        21
    );
    assert!(
        t.db.list_devices(&offline, &page(0))
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------- commands

#[tokio::test]
async fn issue_command_and_idempotency_key() {
    let mut t = Db::new().await;
    assert!(matches!(
        t.run(issue("c-1", "ghost", 1000, None)).await,
        OpResult::NotFound(_)
    ));
    t.run(register("d1")).await;
    t.run(register("d2")).await;
    let ts = T0 + 500;
    let (c, created) = command_of(t.run_at(ts, issue("c-1", "d1", 60_000, Some("k"))).await);
    assert!(created);
    assert_eq!(c.status, CommandStatus::Queued);
    assert_eq!(c.device, "d1");
    assert_eq!(c.params, json!({"delay_s": 5}));
    assert_eq!(c.issued_at, ts);
    assert_eq!(c.updated_at, ts);
    assert_eq!(c.expires_at, ts + 60_000);
    assert_eq!(c.idempotency_key.as_deref(), Some("k"));
    assert_eq!(c.output, None);
    assert_eq!(t.db.command("c-1").await.unwrap(), Some(c.clone()));

    let events_before = t.db.events_since(0, 100).await.unwrap().len();
    // Same key, another cid: the first command, not a second one.
    let (again, created) = command_of(t.run(issue("c-9", "d1", 5, Some("k"))).await);
    assert!(!created);
    assert_eq!(again, c);
    assert!(t.db.command("c-9").await.unwrap().is_none());
    assert_eq!(
        t.db.events_since(0, 100).await.unwrap().len(),
        events_before
    );
    // The key reports the command as it is now.
    t.run(Op::CancelCommand { cid: "c-1".into() }).await;
    let (again, created) = command_of(t.run(issue("c-9", "d1", 5, Some("k"))).await);
    assert!(!created);
    assert_eq!(again.status, CommandStatus::Canceled);

    // Keys are per device.
    let (other, created) = command_of(t.run(issue("c-2", "d2", 5, Some("k"))).await);
    assert!(created);
    assert_eq!(other.id, "c-2");
    // Commands without a key never collide on it.
    assert!(command_of(t.run(issue("c-3", "d1", 5, None)).await).1);
    assert!(command_of(t.run(issue("c-4", "d1", 5, None)).await).1);
    // A reused command id is a conflict.
    assert!(matches!(
        t.run(issue("c-3", "d2", 5, None)).await,
        OpResult::Conflict(_)
    ));
    // A huge TTL saturates rather than wrapping.
    let (c, _) = command_of(t.run(issue("c-5", "d1", u64::MAX, None)).await);
    assert_eq!(c.expires_at, i64::MAX as u64);
}

#[tokio::test]
async fn command_lifecycle_transitions() {
    let mut t = Db::new().await;
    t.run(register("d")).await;
    for cid in ["a", "b", "c", "e", "f"] {
        t.run(issue(cid, "d", 60_000, None)).await;
    }

    // a: queued → sent → accepted → succeeded, with the illegal steps ignored.
    let (c, created) = command_of(
        t.run(Op::CommandSent {
            cid: "a".into(),
            gateway: 1,
        })
        .await,
    );
    assert!(!created);
    assert_eq!(c.status, CommandStatus::Sent);
    assert_eq!(
        t.run(Op::CommandSent {
            cid: "a".into(),
            gateway: 2
        })
        .await,
        OpResult::Ignored
    );
    let (c, _) = command_of(t.run(Op::CommandAccepted { cid: "a".into() }).await);
    assert_eq!(c.status, CommandStatus::Accepted);
    assert_eq!(
        t.run(Op::CommandAccepted { cid: "a".into() }).await,
        OpResult::Ignored
    );
    assert_eq!(
        t.run(Op::CommandSent {
            cid: "a".into(),
            gateway: 1
        })
        .await,
        OpResult::Ignored
    );
    let ts = T0 + 9_999;
    let (c, _) = command_of(
        t.run_at(
            ts,
            Op::CommandResult {
                cid: "a".into(),
                succeeded: true,
                output: json!({"uptime": 3}),
            },
        )
        .await,
    );
    assert_eq!(c.status, CommandStatus::Succeeded);
    assert_eq!(c.output, Some(json!({"uptime": 3})));
    assert_eq!(c.updated_at, ts);
    // Terminal: a second result is ignored, the output stays.
    assert_eq!(
        t.run(Op::CommandResult {
            cid: "a".into(),
            succeeded: false,
            output: json!("late")
        })
        .await,
        OpResult::Ignored
    );
    assert_eq!(
        t.db.command("a").await.unwrap().unwrap().output,
        Some(json!({"uptime": 3}))
    );
    assert_eq!(
        t.run(Op::CancelCommand { cid: "a".into() }).await,
        OpResult::Conflict("command is already succeeded".into())
    );
    assert_eq!(
        t.run(Op::CommandAccepted { cid: "a".into() }).await,
        OpResult::Ignored
    );

    // b: a result straight from queued (the accepted/sent steps are optional).
    let (c, _) = command_of(
        t.run(Op::CommandResult {
            cid: "b".into(),
            succeeded: false,
            output: json!({"error": "busy"}),
        })
        .await,
    );
    assert_eq!(c.status, CommandStatus::Failed);
    assert_eq!(
        t.run(Op::CancelCommand { cid: "b".into() }).await,
        OpResult::Conflict("command is already failed".into())
    );

    // c: accepted straight from queued, then canceled.
    assert_eq!(
        command_of(t.run(Op::CommandAccepted { cid: "c".into() }).await)
            .0
            .status,
        CommandStatus::Accepted
    );
    assert_eq!(
        command_of(t.run(Op::CancelCommand { cid: "c".into() }).await)
            .0
            .status,
        CommandStatus::Canceled
    );
    assert_eq!(
        t.run(Op::CommandResult {
            cid: "c".into(),
            succeeded: true,
            output: json!(null)
        })
        .await,
        OpResult::Ignored
    );
    assert_eq!(
        t.run(Op::CancelCommand { cid: "c".into() }).await,
        OpResult::Conflict("command is already canceled".into())
    );

    // e: sent, then canceled; f: queued, canceled.
    t.run(Op::CommandSent {
        cid: "e".into(),
        gateway: 3,
    })
    .await;
    assert_eq!(
        command_of(t.run(Op::CancelCommand { cid: "e".into() }).await)
            .0
            .status,
        CommandStatus::Canceled
    );
    assert_eq!(
        command_of(t.run(Op::CancelCommand { cid: "f".into() }).await)
            .0
            .status,
        CommandStatus::Canceled
    );
    assert_eq!(
        t.run(Op::CommandSent {
            cid: "f".into(),
            gateway: 1
        })
        .await,
        OpResult::Ignored
    );

    // Unknown commands.
    for op in [
        Op::CommandSent {
            cid: "zz".into(),
            gateway: 1,
        },
        Op::CommandAccepted { cid: "zz".into() },
        Op::CommandResult {
            cid: "zz".into(),
            succeeded: true,
            output: json!({}),
        },
        Op::CancelCommand { cid: "zz".into() },
    ] {
        assert!(matches!(t.run(op).await, OpResult::NotFound(m) if m.contains("zz")));
    }

    // Listing by status, paged by id; counts for every status.
    let canceled =
        t.db.list_commands("d", Some(CommandStatus::Canceled), &page(10))
            .await
            .unwrap();
    let ids: Vec<&str> = canceled.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c", "e", "f"]);
    let p = Page {
        after: Some("c".into()),
        limit: 1,
    };
    let next =
        t.db.list_commands("d", Some(CommandStatus::Canceled), &p)
            .await
            .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, "e");
    let all = t.db.list_commands("d", None, &page(10)).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "e", "f"]);
    assert!(
        t.db.list_commands("other", None, &page(10))
            .await
            .unwrap()
            .is_empty()
    );
    let counts = t.db.command_counts().await.unwrap();
    let expect = [
        (CommandStatus::Queued, 0),
        (CommandStatus::Sent, 0),
        (CommandStatus::Accepted, 0),
        (CommandStatus::Succeeded, 1),
        (CommandStatus::Failed, 1),
        (CommandStatus::Expired, 0),
        (CommandStatus::Canceled, 3),
    ];
    assert_eq!(counts, expect);
}

#[tokio::test]
async fn expire_commands() {
    let mut t = Db::new().await;
    t.run(register("d")).await;
    let ts = T0 + 1_000;
    t.run_at(ts, issue("short", "d", 100, None)).await; // expires ts+100
    t.run_at(ts, issue("sent", "d", 100, None)).await;
    t.run_at(ts, issue("long", "d", 100_000, None)).await;
    t.run_at(ts, issue("done", "d", 100, None)).await;
    t.run(Op::CommandSent {
        cid: "sent".into(),
        gateway: 1,
    })
    .await;
    t.run(Op::CommandResult {
        cid: "done".into(),
        succeeded: true,
        output: json!({}),
    })
    .await;

    // The query used by the leader.
    assert!(t.db.expired_commands(ts + 99, 10).await.unwrap().is_empty());
    assert_eq!(
        t.db.expired_commands(ts + 100, 10).await.unwrap(),
        ["sent", "short"]
    );
    assert_eq!(t.db.expired_commands(ts + 100, 1).await.unwrap().len(), 1);

    // Proposed too early (a clock ahead on the leader's query, behind in
    // the stamp): nothing changes.
    let expire = Op::ExpireCommands {
        cids: vec![
            "short".into(),
            "sent".into(),
            "long".into(),
            "done".into(),
            "ghost".into(),
        ],
    };
    assert_eq!(t.run_at(ts + 99, expire.clone()).await, OpResult::Ignored);
    assert_eq!(status_of(&t.db, "short").await, CommandStatus::Queued);

    assert_eq!(t.run_at(ts + 100, expire.clone()).await, OpResult::Done);
    assert_eq!(status_of(&t.db, "short").await, CommandStatus::Expired);
    assert_eq!(status_of(&t.db, "sent").await, CommandStatus::Expired);
    assert_eq!(status_of(&t.db, "long").await, CommandStatus::Queued);
    assert_eq!(status_of(&t.db, "done").await, CommandStatus::Succeeded);
    let ev = t.db.events_since(0, 100).await.unwrap();
    let ev = ev.last().unwrap();
    assert_eq!(ev.kind, "command.expired");
    let ids: Vec<&str> = ev.data["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["short", "sent"]);
    // Expired is terminal.
    assert_eq!(t.run_at(ts + 200, expire).await, OpResult::Ignored);
    assert_eq!(
        t.run(Op::CancelCommand {
            cid: "short".into()
        })
        .await,
        OpResult::Conflict("command is already expired".into())
    );
    assert_eq!(t.db.expired_commands(u64::MAX, 10).await.unwrap(), ["long"]);
}

// ---------------------------------------------------------------- shadows

#[tokio::test]
async fn desired_state_merge_and_versions() {
    let mut t = Db::new().await;
    assert!(matches!(
        t.run(set_desired("ghost", json!({"a": 1}), None)).await,
        OpResult::NotFound(_)
    ));
    assert!(matches!(
        t.run(report("ghost", json!({"a": 1}))).await,
        OpResult::NotFound(_)
    ));
    t.run(register("d")).await;

    let t1 = T0 + 10_000;
    let s = shadow_of(
        t.run_at(
            t1,
            set_desired(
                "d",
                json!({"speed": 3, "led": {"color": "red", "on": true}, "modes": [1, 2]}),
                Some(0),
            ),
        )
        .await,
    );
    assert_eq!(s.version, 1);
    assert_eq!(
        s.desired,
        json!({"speed": 3, "led": {"color": "red", "on": true}, "modes": [1, 2]})
    );
    assert_eq!(s.delta, s.desired);
    assert_eq!(
        s.desired_updated,
        BTreeMap::from([
            ("led".into(), t1),
            ("modes".into(), t1),
            ("speed".into(), t1)
        ])
    );

    // If-Match: a stale version changes nothing.
    assert_eq!(
        t.run(set_desired("d", json!({"speed": 9}), Some(0))).await,
        OpResult::VersionMismatch { current: 1 }
    );
    assert_eq!(t.db.shadow("d").await.unwrap().unwrap().desired["speed"], 3);

    // Nested merge, null deletes (nested and top level), arrays replace.
    let t2 = t1 + 5;
    let s = shadow_of(
        t.run_at(
            t2,
            set_desired(
                "d",
                json!({"speed": null, "led": {"on": null, "level": 7}, "modes": [3]}),
                Some(1),
            ),
        )
        .await,
    );
    assert_eq!(s.version, 2);
    assert_eq!(
        s.desired,
        json!({"led": {"color": "red", "level": 7}, "modes": [3]})
    );
    assert_eq!(
        s.desired_updated,
        BTreeMap::from([("led".into(), t2), ("modes".into(), t2)])
    );
    // Without If-Match, any version goes.
    let s = shadow_of(t.run(set_desired("d", json!({"fan": "auto"}), None)).await);
    assert_eq!(s.version, 3);
    // Non-object patches are refused.
    assert!(matches!(
        t.run(set_desired("d", json!([1]), None)).await,
        OpResult::Conflict(_)
    ));
    assert!(matches!(
        t.run(report("d", json!("x"))).await,
        OpResult::Conflict(_)
    ));
    assert_eq!(t.db.shadow("d").await.unwrap().unwrap().version, 3);

    // Reported: merged, version unchanged, delta shrinks to what differs.
    let t3 = t2 + 100;
    let s = shadow_of(
        t.run_at(
            t3,
            report(
                "d",
                json!({"led": {"color": "blue", "level": 7}, "modes": [3], "temp": 21.5}),
            ),
        )
        .await,
    );
    assert_eq!(s.version, 3);
    assert_eq!(
        s.reported,
        json!({"led": {"color": "blue", "level": 7}, "modes": [3], "temp": 21.5})
    );
    assert_eq!(s.delta, json!({"led": {"color": "red"}, "fan": "auto"}));
    assert_eq!(
        s.reported_updated,
        BTreeMap::from([
            ("led".into(), t3),
            ("modes".into(), t3),
            ("temp".into(), t3)
        ])
    );
    let s = shadow_of(
        t.run_at(
            t3 + 1,
            report(
                "d",
                json!({"led": {"color": "red"}, "fan": "auto", "temp": null}),
            ),
        )
        .await,
    );
    assert_eq!(s.delta, json!({}));
    assert_eq!(s.reported_updated.get("temp"), None);
    assert_eq!(s.reported_updated.get("fan"), Some(&(t3 + 1)));
    assert_eq!(s.version, 3);
    // Stored and returned views agree.
    assert_eq!(t.db.shadow("d").await.unwrap().unwrap(), s);
    // Events carry the change: the patch and the desired version.
    let ev = t.db.events_since(0, 100).await.unwrap();
    let last = ev.last().unwrap();
    assert_eq!(last.kind, "shadow.reported");
    assert_eq!(
        last.data,
        json!({"device": "d", "version": 3,
            "patch": {"led": {"color": "red"}, "fan": "auto", "temp": null}})
    );
}

#[tokio::test]
async fn shadow_documents_are_capped_deterministically() {
    use crate::limits::{MAX_DEPTH, MAX_DOCUMENT_BYTES};
    let mut t = Db::new().await;
    t.run(register("d")).await;
    let third = "x".repeat(MAX_DOCUMENT_BYTES / 3);
    let ops: [fn(Value) -> Op; 2] = [|p| set_desired("d", p, None), |p| report("d", p)];
    for (i, op) in ops.into_iter().enumerate() {
        let too_large = |r: OpResult| matches!(r, OpResult::TooLarge(_));
        assert!(!too_large(t.run(op(json!({"a": third, "b": third}))).await));
        // A third key would take the document past the cap: refused, no
        // event, nothing changed.
        let events = t.db.events_since(0, 1000).await.unwrap().len();
        let before = t.db.shadow("d").await.unwrap().unwrap();
        assert!(too_large(t.run(op(json!({"c": third}))).await), "{i}");
        // So is a patch past the limits by itself, even if it removes keys.
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!({ "k": deep });
        }
        assert!(too_large(t.run(op(json!({"a": null, "deep": deep}))).await));
        let big = "y".repeat(MAX_DOCUMENT_BYTES);
        assert!(too_large(
            t.run(op(json!({"a": null, "b": null, "c": big}))).await
        ));
        assert_eq!(t.db.shadow("d").await.unwrap().unwrap(), before);
        assert_eq!(t.db.events_since(0, 1000).await.unwrap().len(), events);
        // Room made first, then it fits.
        assert!(!too_large(t.run(op(json!({"a": null, "c": third}))).await));
    }
    let s = t.db.shadow("d").await.unwrap().unwrap();
    assert_eq!(s.version, 2, "refused patches do not bump the version");
    assert!(s.desired.get("c").is_some() && s.reported.get("c").is_some());
}

#[tokio::test]
async fn a_document_stored_over_the_cap_may_still_shrink() {
    use crate::limits::MAX_DOCUMENT_BYTES;
    let mut t = Db::new().await;
    t.run(register("d")).await;
    // As a gateway without the cap would have left it.
    let half = "x".repeat(MAX_DOCUMENT_BYTES / 2);
    let legacy = json!({"a": half, "b": half, "c": half}).to_string();
    {
        let pool = t.db.pool.read().await;
        sqlx::query("UPDATE shadows SET reported = ? WHERE device = 'd'")
            .bind(&legacy)
            .execute(&*pool)
            .await
            .unwrap();
    }
    // Growing it further is refused; shrinking it, even if it stays over
    // the cap, is not; a change of the same size neither.
    assert!(matches!(
        t.run(report("d", json!({"d": 1}))).await,
        OpResult::TooLarge(_)
    ));
    let s = shadow_of(t.run(report("d", json!({"a": null}))).await);
    assert!(s.reported.get("a").is_none());
    let s = shadow_of(
        t.run(report("d", json!({"b": half.replace('x', "z")})))
            .await,
    );
    assert!(s.reported["b"].as_str().is_some_and(|b| b.starts_with('z')));
}

// ---------------------------------------------------------------- presence

#[tokio::test]
async fn presence_epochs_and_sessions_lost() {
    let mut t = Db::new().await;
    assert!(matches!(
        t.run(presence("ghost", 1, 1, true)).await,
        OpResult::NotFound(_)
    ));
    t.run(register("a")).await;
    t.run(register("b")).await;
    t.run(register("c")).await;

    let d = device_of(t.run(presence("a", 1, 5, true)).await);
    assert!(d.online);
    assert_eq!(d.gateway, Some(1));
    // A repeat changes nothing.
    assert_eq!(t.run(presence("a", 1, 5, true)).await, OpResult::Ignored);
    // Stale epoch (an older session's late messages): ignored.
    assert_eq!(t.run(presence("a", 2, 4, true)).await, OpResult::Ignored);
    assert_eq!(t.run(presence("a", 1, 4, false)).await, OpResult::Ignored);
    // Offline from a gateway or epoch that is not the current one: ignored.
    assert_eq!(t.run(presence("a", 2, 5, false)).await, OpResult::Ignored);
    assert_eq!(t.run(presence("a", 1, 6, false)).await, OpResult::Ignored);
    assert!(t.db.device("a").await.unwrap().unwrap().online);

    // The device moves to gateway 2 (newer epoch); gateway 1's late offline is ignored.
    let d = device_of(t.run(presence("a", 2, 6, true)).await);
    assert_eq!(d.gateway, Some(2));
    assert_eq!(t.run(presence("a", 1, 5, false)).await, OpResult::Ignored);
    assert_eq!(t.db.device("a").await.unwrap().unwrap().gateway, Some(2));
    // Its own offline counts.
    let d = device_of(t.run(presence("a", 2, 6, false)).await);
    assert!(!d.online);
    assert_eq!(d.gateway, None);
    // Offline again: nothing to do. The epoch is remembered.
    assert_eq!(t.run(presence("a", 2, 6, false)).await, OpResult::Ignored);
    assert_eq!(t.run(presence("a", 3, 5, true)).await, OpResult::Ignored);
    // A reconnect on the same epoch after offline is allowed.
    assert!(device_of(t.run(presence("a", 3, 6, true)).await).online);

    // Sessions lost: every device on that gateway goes offline.
    t.run(presence("b", 3, 1, true)).await;
    t.run(presence("c", 1, 1, true)).await;
    assert_eq!(
        t.run(Op::GatewaySessionsLost { gateway: 3 }).await,
        OpResult::Done
    );
    for (id, online) in [("a", false), ("b", false), ("c", true)] {
        let d = t.db.device(id).await.unwrap().unwrap();
        assert_eq!(d.online, online, "{id}");
        assert_eq!(d.gateway.is_some(), online, "{id}");
    }
    let ev = t.db.events_since(0, 100).await.unwrap();
    let last = ev.last().unwrap();
    assert_eq!(last.kind, "gateway.sessions_lost");
    assert_eq!(last.data, json!({"gateway": 3, "devices": ["a", "b"]}));
    assert_eq!(
        t.run(Op::GatewaySessionsLost { gateway: 3 }).await,
        OpResult::Ignored
    );
    // After a loss, the device's next session (higher epoch) counts.
    assert!(device_of(t.run(presence("a", 1, 7, true)).await).online);
}

#[tokio::test]
async fn peer_addresses_are_recorded_and_replaced() {
    let mut t = Db::new().await;
    let set = |id: u64, a: &str| Op::SetPeerAddress {
        id,
        address: a.into(),
    };
    assert_eq!(t.run(set(4, "10.0.0.4:7000")).await, OpResult::Done);
    assert_eq!(t.run(set(5, "gw5:7000")).await, OpResult::Done);
    assert_eq!(t.run(set(4, "10.0.0.40:7000")).await, OpResult::Done);
    assert_eq!(
        t.db.peer_addresses().await.unwrap(),
        vec![
            (4, "10.0.0.40:7000".to_string()),
            (5, "gw5:7000".to_string())
        ]
    );
    let ev = t.db.events_since(0, 100).await.unwrap();
    let last = ev.last().unwrap();
    assert_eq!(last.kind, "cluster.peer");
    assert_eq!(last.data, json!({"id": 4, "address": "10.0.0.40:7000"}));
}

// ---------------------------------------------------------------- apply

#[tokio::test]
async fn exactly_once_and_persistence() {
    let dir = TempDir::new().unwrap();
    let entries = workload();
    let n = entries.len() as u64;
    let first_dump;
    {
        let db = StateDb::open(dir.path()).await.unwrap();
        let results = db.apply(entries.clone(), n).await.unwrap();
        assert_eq!(results.len(), entries.len());
        assert!(results.iter().any(|r| !matches!(r, OpResult::Ignored)));
        assert_eq!(db.applied_index(), n);
        first_dump = dump(&db).await;

        // The same batch again: all ignored, no effect.
        let again = db.apply(entries.clone(), n).await.unwrap();
        assert_eq!(again, vec![OpResult::Ignored; entries.len()]);
        assert_eq!(dump(&db).await, first_dump);

        // A batch overlapping the applied index: only the new tail applies.
        let mut overlap = entries[n as usize - 2..].to_vec();
        overlap.push(entry(n + 1, T0 + 1_000_000, register("late")));
        let r = db.apply(overlap, n + 1).await.unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], OpResult::Ignored);
        assert_eq!(r[1], OpResult::Ignored);
        assert!(matches!(r[2], OpResult::Device(_)));
        // An entry repeated inside one batch applies once.
        let dup = entry(n + 2, T0, register("twice"));
        let r = db.apply(vec![dup.clone(), dup], n + 2).await.unwrap();
        assert!(matches!(r[0], OpResult::Device(_)));
        assert_eq!(r[1], OpResult::Ignored);
        // Indexes without application entries are recorded too.
        let r = db.apply(Vec::new(), n + 5).await.unwrap();
        assert!(r.is_empty());
        assert_eq!(db.applied_index(), n + 5);
        // Going backwards never lowers the index.
        db.apply(Vec::new(), 2).await.unwrap();
        assert_eq!(db.applied_index(), n + 5);
        db.close().await;
    }
    // Reopened from disk: the index and the state persisted.
    let db = StateDb::open(dir.path()).await.unwrap();
    assert_eq!(db.applied_index(), n + 5);
    assert_eq!(*db.watch_applied().borrow(), n + 5);
    assert!(db.device("late").await.unwrap().is_some());
    let again = db.apply(entries.clone(), n).await.unwrap();
    assert_eq!(again, vec![OpResult::Ignored; entries.len()]);
    assert_eq!(
        db.events_since(0, u32::MAX).await.unwrap().len(),
        serde_json::from_str::<Value>(&first_dump).unwrap()["events"]
            .as_array()
            .unwrap()
            .len()
            + 2
    );
}

#[tokio::test]
async fn determinism_same_entries_same_state() {
    let entries = workload();
    let n = entries.len() as u64;
    let a = Db::new().await;
    let b = Db::new().await;
    // One database in one batch, the other one entry per batch.
    let ra = a.db.apply(entries.clone(), n).await.unwrap();
    let mut rb = Vec::new();
    for e in entries {
        let i = e.index;
        rb.extend(b.db.apply(vec![e], i).await.unwrap());
    }
    assert_eq!(ra, rb);
    let (da, db) = (dump(&a.db).await, dump(&b.db).await);
    assert_eq!(da, db);
    // Sanity: the workload did what it says.
    let v: Value = serde_json::from_str(&da).unwrap();
    assert_eq!(v["devices"].as_array().unwrap().len(), 2);
    assert_eq!(v["tokens"]["t-op"], json!("operator"));
}

/// Finding (issue 14): an entry the state machine could not decode was
/// applied as a no-op and the applied index moved on, so a member of
/// another version would silently diverge. Now it is an error naming the
/// entry and its format, and nothing of its batch is applied.
#[tokio::test]
async fn an_undecodable_entry_stops_apply_and_applies_nothing_of_its_batch() {
    let t = Db::new().await;
    t.db.apply(vec![entry(1, T0, register("before"))], 1)
        .await
        .unwrap();
    for (data, says) in [
        (b"{not json".to_vec(), "entry format 1 (JSON), damaged"),
        (vec![0x02, 0xc1], "entry format 2 (MessagePack), damaged"),
        (
            vec![0x07, 1, 2, 3],
            "unknown entry format (first byte 0x07)",
        ),
    ] {
        let bad = Committed {
            index: 3,
            term: 1,
            data: data.into(),
        };
        let batch = vec![
            entry(2, T0, register("d")),
            bad,
            entry(4, T0, register("e")),
        ];
        let err = t.db.apply(batch, 4).await.unwrap_err().to_string();
        assert!(err.contains("committed entry 3"), "{err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(t.db.applied_index(), 1, "nothing of the batch is applied");
        let ev = t.db.events_since(0, 10).await.unwrap();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(t.db.device("d").await.unwrap().is_none());
    }
}

// ---------------------------------------------------------------- events

#[tokio::test]
async fn events_resume_exactly() {
    let t = Db::new().await;
    let entries = workload();
    let n = entries.len() as u64;
    t.db.apply(entries, n).await.unwrap();
    let all = t.db.events_since(0, u32::MAX).await.unwrap();
    assert!(all.len() > 10);
    // Indexes strictly increase, at most one event per entry.
    assert!(all.windows(2).all(|w| w[0].index < w[1].index));
    // Failed/ignored operations produce no event: the repeated idempotency
    // key (entry 11) did not.
    assert!(all.iter().all(|e| e.index != 11));
    assert_eq!(all[0].kind, "token");
    let issued = all.iter().find(|e| e.index == 8).unwrap();
    assert_eq!(issued.kind, "command.issued");
    assert_eq!(issued.data["id"], "c-1");
    // Reading in pages of 3, resuming from the last id seen, yields the same.
    let mut seen = Vec::new();
    let mut last = 0;
    loop {
        let page = t.db.events_since(last, 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        last = page.last().unwrap().index;
        seen.extend(page);
    }
    assert_eq!(seen, all);
    // Resuming from an index with no event works the same.
    let after11 = t.db.events_since(11, u32::MAX).await.unwrap();
    assert_eq!(
        after11,
        all.iter()
            .filter(|e| e.index > 11)
            .cloned()
            .collect::<Vec<_>>()
    );
    assert!(t.db.events_since(n, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn events_are_bounded() {
    let t = Db::new().await;
    t.db.apply(vec![entry(1, T0, register("a"))], 1)
        .await
        .unwrap();
    t.db.apply(vec![entry(50_000, T0, register("b"))], 50_000)
        .await
        .unwrap();
    assert_eq!(t.db.events_since(0, 10).await.unwrap().len(), 2);
    let last = 1 + EVENTS_RETAINED + 10;
    t.db.apply(vec![entry(last, T0, register("c"))], last)
        .await
        .unwrap();
    let ids: Vec<u64> =
        t.db.events_since(0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.index)
            .collect();
    assert_eq!(ids, [50_000, last]);
}

/// A large batch (heavy: applied in `block_in_place` on a multi-thread
/// runtime) stores every event, in order, each at its entry's index; an
/// entry that changed nothing has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_stores_every_event_at_its_index() {
    let t = Db::new().await;
    let n = 1_201u64;
    let mut entries: Vec<_> = (1..=n)
        .map(|i| entry(i, T0, register(&format!("d{i}"))))
        .collect();
    // Registering d7 again changes nothing: no event at that index.
    entries.push(entry(n + 1, T0, register("d7")));
    t.db.apply(entries, n + 1).await.unwrap();
    let events = t.db.events_since(0, 2_000).await.unwrap();
    let ids: Vec<u64> = events.iter().map(|e| e.index).collect();
    assert_eq!(ids, (1..=n).collect::<Vec<_>>());
    assert!(events.iter().all(|e| e.kind == "device.registered"));
    assert_eq!(events[700].data["id"], "d701");
}

#[tokio::test]
async fn broadcast_after_commit() {
    let t = Arc::new(Db::new().await);
    let mut rx = t.db.subscribe();
    let mut applied = t.db.watch_applied();
    // No subscriber on a second db: apply still succeeds.
    let lonely = Db::new().await;
    lonely
        .db
        .apply(vec![entry(1, T0, register("x"))], 1)
        .await
        .unwrap();

    let entries = vec![
        entry(1, T0, register("d")),
        entry(2, T0, issue("c", "d", 1000, None)),
        entry(3, T0, issue("c", "d", 1000, None)), // conflict: no event
        entry(4, T0, Op::CancelCommand { cid: "c".into() }),
    ];
    let t2 = t.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..3 {
            let ev = rx.recv().await.unwrap();
            // Whatever is broadcast is already committed and visible.
            assert!(t2.db.applied_index() >= ev.index);
            let stored = t2.db.events_since(ev.index - 1, 1).await.unwrap();
            assert_eq!(stored, vec![ev.clone()]);
            got.push(ev);
        }
        got
    });
    t.db.apply(entries, 4).await.unwrap();
    let got = reader.await.unwrap();
    let kinds: Vec<(u64, &str)> = got.iter().map(|e| (e.index, e.kind.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (1, "device.registered"),
            (2, "command.issued"),
            (4, "command.canceled")
        ]
    );
    assert_eq!(got[2].data["status"], "canceled");
    applied.changed().await.unwrap();
    assert_eq!(*applied.borrow(), 4);
}

// ---------------------------------------------------------------- snapshots

/// An image of `db`, as the node driver would have it written, read whole.
async fn snapshot_bytes(db: &StateDb) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image");
    db.write_image(&path).await.unwrap();
    std::fs::read(&path).unwrap()
}

/// Restores `db` from `data`, streamed from a file as the driver does.
async fn restore_bytes(db: &StateDb, meta: &SnapshotMeta, data: Vec<u8>) -> Result<(), StateError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image");
    std::fs::write(&path, &data).unwrap();
    let image = coordinator::image::SnapshotImage::of_file(path).unwrap();
    db.restore(meta, image.open().unwrap()).await
}

#[tokio::test]
async fn snapshot_restore_into_another_directory() {
    let src = Db::new().await;
    let entries = workload();
    let n = entries.len() as u64;
    src.db.apply(entries, n).await.unwrap();
    let image = snapshot_bytes(&src.db).await;
    assert!(image.starts_with(b"SQLite format 3\0"));
    // The temp file is gone.
    let names: Vec<String> = std::fs::read_dir(src.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("snapshot")), "{names:?}");

    // The target has different state of its own, which the image replaces.
    let mut dst = Db::new().await;
    dst.run(register("stale-device")).await;
    dst.run(register("another")).await;
    let mut watch = dst.db.watch_applied();
    let meta = SnapshotMeta {
        index: n,
        term: 3,
        conf_state: ConfState::with_voters([1, 2, 3]),
    };
    restore_bytes(&dst.db, &meta, image.clone()).await.unwrap();
    assert_eq!(dst.db.applied_index(), n);
    assert!(watch.has_changed().unwrap());
    assert_eq!(*watch.borrow_and_update(), n);
    assert_eq!(dump(&dst.db).await, dump(&src.db).await);
    assert!(dst.db.device("stale-device").await.unwrap().is_none());

    // It goes on applying from there, exactly like the source.
    let next = vec![entry(
        n + 1,
        T0 + 9,
        issue("c-new", "pump-1", 5, Some("k1")),
    )];
    let r1 = src.db.apply(next.clone(), n + 1).await.unwrap();
    let r2 = dst.db.apply(next.clone(), n + 1).await.unwrap();
    assert_eq!(r1, r2);
    assert_eq!(dump(&dst.db).await, dump(&src.db).await);

    // Reopened from disk, the restored database is still there.
    let dir = dst.dir;
    drop(dst.db);
    let reopened = StateDb::open(dir.path()).await.unwrap();
    assert_eq!(reopened.applied_index(), n + 1);
    assert_eq!(dump(&reopened).await, dump(&src.db).await);
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn restore_sets_the_applied_index_from_meta() {
    // An image taken at index n but installed as of index n + 3 (entries
    // without application data): the meta index wins.
    let src = Db::new().await;
    src.db
        .apply(vec![entry(1, T0, register("d"))], 1)
        .await
        .unwrap();
    let image = snapshot_bytes(&src.db).await;
    let dst = Db::new().await;
    let meta = SnapshotMeta {
        index: 4,
        term: 1,
        conf_state: ConfState::with_voters([1]),
    };
    restore_bytes(&dst.db, &meta, image).await.unwrap();
    assert_eq!(dst.db.applied_index(), 4);
    assert!(dst.db.device("d").await.unwrap().is_some());
    let r = dst
        .db
        .apply(vec![entry(4, T0, register("e"))], 4)
        .await
        .unwrap();
    assert_eq!(r, vec![OpResult::Ignored]);
}

#[tokio::test]
async fn restore_with_empty_data() {
    let mut t = Db::new().await;
    t.run(register("d")).await;
    t.run(Op::BootstrapAdmin {
        token_hash: "t-admin".into(),
    })
    .await;
    let meta = SnapshotMeta {
        index: 7,
        term: 2,
        conf_state: ConfState::with_voters([1]),
    };
    restore_bytes(&t.db, &meta, Vec::new()).await.unwrap();
    assert_eq!(t.db.applied_index(), 7);
    assert!(t.db.device("d").await.unwrap().is_none());
    assert!(!t.db.has_tokens().await.unwrap());
    assert!(t.db.events_since(0, 10).await.unwrap().is_empty());
    // Usable: applies from there.
    let r =
        t.db.apply(vec![entry(8, T0, register("d"))], 8)
            .await
            .unwrap();
    assert!(matches!(r[0], OpResult::Device(_)));
    // Index 0 with no data is the initial state.
    let meta0 = SnapshotMeta {
        index: 0,
        term: 0,
        conf_state: ConfState::with_voters([1]),
    };
    restore_bytes(&t.db, &meta0, Vec::new()).await.unwrap();
    assert_eq!(t.db.applied_index(), 0);
    assert_eq!(
        dump(&t.db).await,
        dump(&Db::new().await.db).await,
        "an empty restore equals a fresh database"
    );
}

/// The modes of the files in `dir`, by name.
#[cfg(unix)]
fn file_modes(dir: &std::path::Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut v: Vec<(String, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
            (e.file_name().to_string_lossy().into_owned(), mode)
        })
        .collect();
    v.sort();
    v
}

/// The database holds secret and token hashes: its files are 0600 from
/// the start, through snapshots and restores (whose image replaces
/// `state.db`), and an existing one left readable is closed on open.
#[cfg(unix)]
#[tokio::test]
async fn the_database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let private = |dir: &std::path::Path| {
        let modes = file_modes(dir);
        assert!(modes.iter().any(|(n, _)| n == "state.db-wal"), "{modes:?}");
        for (name, mode) in &modes {
            assert_eq!(*mode, 0o600, "{name} in {modes:?}");
        }
    };
    let mut t = Db::new().await;
    t.run(register("d")).await;
    private(t.dir.path());
    let image = snapshot_bytes(&t.db).await;
    private(t.dir.path());
    let meta = SnapshotMeta {
        index: 9,
        term: 2,
        conf_state: ConfState::with_voters([1]),
    };
    restore_bytes(&t.db, &meta, image).await.unwrap();
    t.next = 10;
    t.run(register("e")).await;
    private(t.dir.path());
    restore_bytes(&t.db, &meta, Vec::new()).await.unwrap();
    t.next = 10;
    t.run(register("f")).await;
    private(t.dir.path());

    let dir = t.dir;
    drop(t.db);
    for (name, _) in file_modes(dir.path()) {
        let path = dir.path().join(name);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let reopened = StateDb::open(dir.path()).await.unwrap();
    assert!(reopened.device("f").await.unwrap().is_some());
    private(dir.path());
}

#[tokio::test]
async fn restore_of_garbage_fails_and_keeps_the_state() {
    let mut t = Db::new().await;
    t.run(register("d")).await;
    let before = dump(&t.db).await;
    let meta = SnapshotMeta {
        index: 10,
        term: 1,
        conf_state: ConfState::with_voters([1]),
    };
    let garbage = vec![0x42u8; 8192];
    assert!(restore_bytes(&t.db, &meta, garbage).await.is_err());
    assert_eq!(t.db.applied_index(), 1);
    assert_eq!(dump(&t.db).await, before);
    assert!(!t.dir.path().join(RESTORE_TMP).exists());
}

#[tokio::test]
async fn queries_during_restore_wait_instead_of_failing() {
    let src = Db::new().await;
    let entries = workload();
    let n = entries.len() as u64;
    src.db.apply(entries, n).await.unwrap();
    let image = snapshot_bytes(&src.db).await;

    let dst = Arc::new(Db::new().await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (dst, stop) = (dst.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                dst.db
                    .list_devices(&DeviceFilter::default(), &page(100))
                    .await
                    .unwrap();
                dst.db.events_since(0, 100).await.unwrap();
                n += 1;
                tokio::task::yield_now().await;
            }
            n
        }));
    }
    for i in 0..5 {
        let meta = SnapshotMeta {
            index: n + i,
            term: 1,
            conf_state: ConfState::with_voters([1]),
        };
        restore_bytes(&dst.db, &meta, image.clone()).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    assert_eq!(dst.db.applied_index(), n + 4);
    assert_eq!(
        dst.db
            .list_devices(&DeviceFilter::default(), &page(100))
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn the_change_feed_types_what_the_events_say() {
    let mut t = Db::new().await;
    let mut changes = t.db.changes();
    let mut events = t.db.subscribe();
    let ops = vec![
        Op::BootstrapAdmin {
            token_hash: "h".into(),
        },
        register("d"),
        Op::UpdateDevice {
            id: "d".into(),
            labels: None,
            attributes: Some(json!({"model": "X3"})),
            cert_sha256: None,
        },
        Op::RotateSecret {
            id: "d".into(),
            secret_hash: "h2".into(),
        },
        Op::Presence {
            device: "d".into(),
            gateway: 2,
            epoch: 77,
            online: true,
        },
        issue("c1", "d", 1000, None),
        Op::CommandSent {
            cid: "c1".into(),
            gateway: 2,
        },
        Op::CommandAccepted { cid: "c1".into() },
        Op::CommandResult {
            cid: "c1".into(),
            succeeded: true,
            output: json!({"ok": 1}),
        },
        issue("c2", "d", 1000, None),
        Op::CancelCommand { cid: "c2".into() },
        issue("c3", "d", 1, None),
        Op::ExpireCommands {
            cids: vec!["c3".into()],
        },
        Op::SetDesired {
            device: "d".into(),
            patch: json!({"on": true}),
            expected_version: None,
        },
        Op::ReportState {
            device: "d".into(),
            patch: json!({"on": false}),
        },
        Op::GatewaySessionsLost { gateway: 2 },
        Op::SetPeerAddress {
            id: 4,
            address: "gw4:7000".into(),
        },
        Op::DeleteDevice { id: "d".into() },
        // Changes nothing: neither a change nor an event.
        Op::DeleteDevice { id: "d".into() },
    ];
    let kinds: Vec<&str> = ops.iter().map(Op::kind).collect();
    for op in ops {
        // Stamped late enough for c3 to have expired.
        let ts = T0 + 10_000 + t.next;
        t.run_at(ts, op).await;
    }
    let mut got = Vec::new();
    while let Ok(change) = changes.try_recv() {
        let ev = events.try_recv().expect("an event per change");
        assert_eq!(change.kind(), ev.kind, "{change:?}");
        assert_eq!(change.data().unwrap(), ev.data, "{change:?}");
        got.push(change);
    }
    assert!(events.try_recv().is_err(), "a change per event");
    let got_kinds: Vec<&str> = got.iter().map(Change::kind).collect();
    assert_eq!(got_kinds, kinds[..kinds.len() - 1]);

    // What the gateway's own consumers match on is typed.
    assert!(matches!(&got[4], Change::Presence { device, epoch: 77 }
        if device.gateway == Some(2) && device.online));
    assert!(matches!(&got[5], Change::Command(CommandStep::Issued, c)
        if c.id == "c1" && c.status == CommandStatus::Queued));
    assert!(matches!(&got[12], Change::CommandsExpired(cmds) if cmds[0].id == "c3"));
    assert!(matches!(
        &got[13],
        Change::Shadow {
            side: ShadowSide::Desired,
            version: 1,
            ..
        }
    ));
    assert!(matches!(
        &got[14],
        Change::Shadow {
            side: ShadowSide::Reported,
            ..
        }
    ));
    assert_eq!(
        got[15],
        Change::SessionsLost {
            gateway: 2,
            devices: vec!["d".into()]
        }
    );
    assert_eq!(
        got[16],
        Change::PeerAddress {
            id: 4,
            address: "gw4:7000".into()
        }
    );
    assert_eq!(got[17], Change::DeviceDeleted { id: "d".into() });
}

/// A resume from before the kept events is refused with the oldest index a
/// stream can resume after, in the same read as the events (issue 14).
#[tokio::test]
async fn events_after_an_index_no_longer_kept_are_refused_with_the_oldest() {
    let t = Db::new().await;
    t.db.apply(vec![entry(1, T0, register("early"))], 1)
        .await
        .unwrap();
    assert_eq!(
        t.db.events_since_checked(0, 10, usize::MAX)
            .await
            .unwrap()
            .unwrap()
            .len(),
        1
    );
    // Far along the log: the early event is dropped.
    let late = EVENTS_RETAINED + 500;
    t.db.apply(vec![entry(late, T0, register("late"))], late)
        .await
        .unwrap();
    let oldest = resumable_after(late);
    assert_eq!(oldest, 499);
    assert_eq!(
        t.db.events_since_checked(0, 10, usize::MAX).await.unwrap(),
        Err(oldest)
    );
    let kept =
        t.db.events_since_checked(oldest, 10, usize::MAX)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(kept.iter().map(|e| e.index).collect::<Vec<_>>(), [late]);
}

/// Thousands of one-entry batches in a row, as a quiet group hands them
/// over, all apply. Taking sqlx's lock on the writer's handle for each
/// batch hung after a few hundred (sqlx's worker and apply each waiting for
/// the lock); the writer takes it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_small_batches_in_a_row_never_stall() {
    let t = Db::new().await;
    t.db.apply(vec![entry(1, T0, register("d1"))], 1)
        .await
        .unwrap();
    let run = async {
        for i in 2..=3_000u64 {
            let op = Op::SetDesired {
                device: "d1".into(),
                patch: json!({"n": i}),
                expected_version: None,
            };
            t.db.apply(vec![entry(i, T0 + i, op)], i).await.unwrap();
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("3,000 batches applied within two minutes");
    assert_eq!(t.db.applied_index(), 3_000);
    let shadow = t.db.shadow("d1").await.unwrap().unwrap();
    assert_eq!(shadow.desired["n"], 3_000);
    assert_eq!(shadow.version, 2_999);
}

mod jobs;

/// The batched lookups of the deliveries on subscribe: which devices have
/// commands to be sent again (queued, sent or accepted — not finished
/// ones), and the shadows of many devices at once (unknown ones left out).
#[tokio::test]
async fn deliveries_find_open_commands_and_shadows_of_many_devices_at_once() {
    let mut t = Db::new().await;
    for d in ["q", "s", "a", "done", "none"] {
        t.run(register(d)).await;
    }
    for (cid, d) in [("c-q", "q"), ("c-s", "s"), ("c-a", "a"), ("c-done", "done")] {
        t.run(issue(cid, d, 60_000, None)).await;
    }
    t.run(Op::CommandSent {
        cid: "c-s".into(),
        gateway: 1,
    })
    .await;
    t.run(Op::CommandAccepted { cid: "c-a".into() }).await;
    t.run(Op::CommandResult {
        cid: "c-done".into(),
        succeeded: true,
        output: json!(null),
    })
    .await;
    // Ids are bound as one JSON array: quotes and backslashes are data.
    let ask: Vec<String> = ["q", "s", "a", "done", "none", "un\"known\\", "q' OR 1=1 --"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut open = t.db.devices_with_open_commands(&ask).await.unwrap();
    open.sort();
    assert_eq!(open, ["a", "q", "s"]);
    assert!(
        t.db.devices_with_open_commands(&[])
            .await
            .unwrap()
            .is_empty()
    );

    t.run(set_desired("q", json!({"valve": "open"}), None))
        .await;
    t.run(report("s", json!({"valve": "shut"}))).await;
    let mut shadows = t.db.shadows(&ask).await.unwrap();
    shadows.sort_by(|a, b| a.device.cmp(&b.device));
    let mut each = Vec::new();
    for d in &ask {
        if let Some(s) = t.db.shadow(d).await.unwrap() {
            each.push(s);
        }
    }
    each.sort_by(|a, b| a.device.cmp(&b.device));
    assert_eq!(shadows, each, "the same as one query per device");
    assert_eq!(
        shadows.iter().find(|s| s.device == "q").unwrap().delta,
        json!({"valve": "open"})
    );
    assert!(t.db.shadows(&[]).await.unwrap().is_empty());
}
