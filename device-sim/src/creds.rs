//! Device credentials: registering simulated devices over REST (in
//! batches of 1,000, one log entry each), and the devices file that keeps
//! their secrets between runs.
//!
//! The gateway shows a device's secret only once, at registration. A run
//! writes every id and secret it knows to `--devices-file`; a later run
//! reads them back and registers only the devices still missing. A device
//! that is already registered but whose secret nobody kept cannot log in:
//! that is reported clearly, unless `--rotate-existing` asks to give it a
//! new secret.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::rest::{Api, BatchRegistration, MAX_BATCH, Registration};

/// A device id and its MQTT password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Device id (also client id and username).
    pub id: String,
    /// Its secret (the MQTT password).
    pub secret: String,
}

/// The devices file: every id and secret known, in id order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DevicesFile {
    /// The devices.
    pub devices: Vec<Credentials>,
}

/// Id of simulated device `index`: the prefix, then the index on at least
/// six digits (`sim-000042`), so ids stay the same whatever the fleet size.
pub fn device_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:06}")
}

/// Checks that `prefix` makes valid device ids (`[A-Za-z0-9_.-]`, at most
/// 64 characters with the index).
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "the prefix {prefix:?} contains {c:?}; device ids may only use A-Z a-z 0-9 _ . -"
        ));
    }
    if prefix.len() > 50 {
        return Err(format!(
            "the prefix {prefix:?} is too long (at most 50 characters)"
        ));
    }
    Ok(())
}

impl DevicesFile {
    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<DevicesFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DevicesFile::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a devices file (expected {{\"devices\":[{{\"id\":..,\"secret\":..}}]}})",
                path.display()
            )
        })
    }

    /// Writes `path` atomically (temp file, then rename), readable by the
    /// owner only: it holds secrets.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(self).context("encoding the devices file")?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&json)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    /// The known secrets by id.
    pub fn secrets(&self) -> HashMap<String, String> {
        self.devices
            .iter()
            .map(|c| (c.id.clone(), c.secret.clone()))
            .collect()
    }

    /// Adds or replaces entries, keeping the list sorted by id.
    pub fn merge(&mut self, creds: &[Credentials]) {
        let mut all = self.secrets();
        for c in creds {
            all.insert(c.id.clone(), c.secret.clone());
        }
        let mut devices: Vec<Credentials> = all
            .into_iter()
            .map(|(id, secret)| Credentials { id, secret })
            .collect();
        devices.sort_by(|a, b| a.id.cmp(&b.id));
        self.devices = devices;
    }
}

/// What to provision.
#[derive(Debug, Clone)]
pub struct Provision<'a> {
    /// Id prefix.
    pub prefix: &'a str,
    /// How many devices (ids `prefix000000` …).
    pub count: usize,
    /// Where secrets are kept between runs.
    pub file: Option<&'a Path>,
    /// Give devices registered earlier (secret unknown) a new secret.
    pub rotate_existing: bool,
    /// Registrations in flight at once.
    pub concurrency: usize,
}

/// The credentials of devices `0..count`: from the devices file where
/// known, registered (or, if asked, rotated) over REST otherwise. Writes the
/// file back with everything known.
pub async fn provision(api: Option<&Api>, p: &Provision<'_>) -> Result<Vec<Credentials>> {
    let mut file = match p.file {
        Some(path) => DevicesFile::load(path)?,
        None => DevicesFile::default(),
    };
    let known = file.secrets();
    let ids: Vec<String> = (0..p.count).map(|i| device_id(p.prefix, i)).collect();
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !known.contains_key(*id))
        .cloned()
        .collect();
    let mut fresh = Vec::new();
    if !missing.is_empty() {
        let Some(api) = api else {
            bail!(
                "{} of the {} devices have no known secret{}; give --api and a token \
                 (--token or --token-file) to register them",
                missing.len(),
                p.count,
                p.file
                    .map(|f| format!(" in {}", f.display()))
                    .unwrap_or_default()
            );
        };
        let (registered, taken) = register_all(api, &missing, p).await?;
        fresh = registered;
        if let Some(path) = p.file {
            file.merge(&fresh);
            file.save(path)?;
        }
        if !taken.is_empty() {
            let sample: Vec<&str> = taken.iter().take(5).map(String::as_str).collect();
            bail!(
                "{} devices are already registered but their secrets are unknown (e.g. {}); \
                 pass the --devices-file written when they were registered, use another \
                 --prefix, delete them (DELETE /v1/devices/{{id}}), or give them new secrets \
                 with --rotate-existing",
                taken.len(),
                sample.join(", ")
            );
        }
    }
    let fresh: HashMap<String, String> = fresh.into_iter().map(|c| (c.id, c.secret)).collect();
    ids.into_iter()
        .map(|id| {
            let secret = known
                .get(&id)
                .or_else(|| fresh.get(&id))
                .cloned()
                .with_context(|| format!("no secret for {id}"))?;
            Ok(Credentials { id, secret })
        })
        .collect()
}

/// Batch registrations in flight at once: two keep the gateway busy (one
/// is checked and proposed while the other commits) without holding more
/// than two bodies of up to 1,000 devices there.
const BATCHES_IN_FLIGHT: usize = 2;

/// Registers `ids` in batches of up to [`MAX_BATCH`] (one log entry each);
/// a batch refused because some of its ids are taken is registered one
/// device at a time instead (finding the taken ones, and rotating them if
/// asked). Returns the new credentials and the ids that were already taken
/// (unless rotated). What was registered is saved to the devices file
/// before an error is returned.
async fn register_all(
    api: &Api,
    ids: &[String],
    p: &Provision<'_>,
) -> Result<(Vec<Credentials>, Vec<String>)> {
    let gate = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for chunk in ids.chunks(MAX_BATCH) {
        let (api, gate, chunk) = (api.clone(), gate.clone(), chunk.to_vec());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let r = api.register_batch(&chunk).await;
            (chunk, r)
        });
    }
    let mut created = Vec::new();
    let mut one_by_one = Vec::new();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let (chunk, r) = joined.context("a registration task failed")?;
        match r {
            Ok(BatchRegistration::Created(done)) => created.extend(
                done.into_iter()
                    .map(|(id, secret)| Credentials { id, secret }),
            ),
            Ok(BatchRegistration::Conflict(_)) => one_by_one.extend(chunk),
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        save_partial(p, &created)?;
        return Err(e);
    }
    one_by_one.sort();
    let (more, taken) = match register_each(api, &one_by_one, p).await {
        Ok(r) => r,
        Err(e) => {
            save_partial(p, &created)?;
            return Err(e);
        }
    };
    created.extend(more);
    Ok((created, taken))
}

/// Keeps what was registered before a failure: the devices file gets it.
fn save_partial(p: &Provision<'_>, created: &[Credentials]) -> Result<()> {
    if let Some(path) = p.file {
        let mut file = DevicesFile::load(path)?;
        file.merge(created);
        file.save(path)?;
    }
    Ok(())
}

/// Registers `ids` one request each (`--register-concurrency` at once);
/// returns the new credentials and the ids that were already taken
/// (unless rotated).
async fn register_each(
    api: &Api,
    ids: &[String],
    p: &Provision<'_>,
) -> Result<(Vec<Credentials>, Vec<String>)> {
    let gate = Arc::new(Semaphore::new(p.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for id in ids {
        let (api, gate, id, rotate) = (api.clone(), gate.clone(), id.clone(), p.rotate_existing);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let r = match api.register(&id).await {
                Ok(Registration::Created(secret)) => Ok(Some(secret)),
                Ok(Registration::Exists) if rotate => api.rotate_secret(&id).await.map(Some),
                Ok(Registration::Exists) => Ok(None),
                Err(e) => Err(e),
            };
            (id, r)
        });
    }
    let mut created = Vec::new();
    let mut taken = Vec::new();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let (id, r) = joined.context("a registration task failed")?;
        match r {
            Ok(Some(secret)) => created.push(Credentials { id, secret }),
            Ok(None) => taken.push(id),
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
    }
    taken.sort();
    if let Some(e) = first_error {
        // Keep what was registered: the caller saves it before failing.
        save_partial(p, &created)?;
        return Err(e);
    }
    Ok((created, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_prefixes_checked() {
        assert_eq!(device_id("sim-", 42), "sim-000042");
        assert_eq!(device_id("x", 1_234_567), "x1234567");
        assert!(check_prefix("sim-").is_ok());
        assert!(check_prefix("bad/prefix").is_err());
        assert!(check_prefix(&"p".repeat(51)).is_err());
    }

    #[test]
    fn devices_file_round_trips_and_merges() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("devices.json");
        assert!(
            DevicesFile::load(&path)
                .expect("missing")
                .devices
                .is_empty()
        );
        let mut f = DevicesFile::default();
        f.merge(&[
            Credentials {
                id: "b".into(),
                secret: "2".into(),
            },
            Credentials {
                id: "a".into(),
                secret: "1".into(),
            },
        ]);
        f.save(&path).expect("save");
        let mut back = DevicesFile::load(&path).expect("load");
        assert_eq!(back.devices[0].id, "a");
        back.merge(&[Credentials {
            id: "a".into(),
            secret: "9".into(),
        }]);
        assert_eq!(back.secrets()["a"], "9");
        assert_eq!(back.devices.len(), 2);
        std::fs::write(&path, "nope").expect("write");
        let err = DevicesFile::load(&path).expect_err("garbage");
        assert!(err.to_string().contains("not a devices file"), "{err}");
    }

    #[tokio::test]
    async fn without_api_missing_secrets_are_an_error() {
        let p = Provision {
            prefix: "sim-",
            count: 3,
            file: None,
            rotate_existing: false,
            concurrency: 1,
        };
        let err = provision(None, &p).await.expect_err("no api");
        assert!(err.to_string().contains("--api"), "{err}");
    }
}
