//! `gateway certs`: the certificates of a group with peer TLS — a cluster
//! CA and one certificate per gateway naming it as the peer transport
//! requires (`node-<id>.<cluster-id>.entente`, see
//! `coordinator::transport::peer_tls_name`), written as private files.
//!
//! Layout of `--out`: `ca.pem` and `ca.key` (the CA), and `node-<id>.pem`
//! and `node-<id>.key` per gateway. Certificates are valid from the day
//! before they are made for ten years; keys are ECDSA P-256.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use coordinator::transport::peer_tls_name;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Flags of `gateway certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Directory to write into (created if missing, mode 0700).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The node ids of the gateways, comma-separated (e.g. 1,2,3).
    #[arg(long, value_name = "IDS")]
    pub nodes: String,
    /// The cluster id the gateways run with (--cluster-id); default
    /// `entente`, as theirs.
    #[arg(long, env = "ENTENTE_CLUSTER_ID", default_value = "entente")]
    pub cluster_id: String,
}

/// What `gateway certs` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The cluster CA's certificate and key.
    pub ca: (PathBuf, PathBuf),
    /// Per node id: its certificate and key.
    pub nodes: Vec<(u64, PathBuf, PathBuf)>,
    /// The cluster id the certificates name.
    pub cluster_id: String,
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wrote the cluster CA: {} (certificate) and {} (private key: keep it safe; it is \
             needed only to add gateways)",
            self.ca.0.display(),
            self.ca.1.display()
        )?;
        for (id, cert, key) in &self.nodes {
            writeln!(
                f,
                "wrote gateway {id}: {} ({}) and {}",
                cert.display(),
                peer_tls_name(&self.cluster_id, *id),
                key.display()
            )?;
        }
        writeln!(f, "start each gateway with its own files:")?;
        let cluster = if self.cluster_id == "entente" {
            String::new()
        } else {
            format!(" --cluster-id {}", self.cluster_id)
        };
        for (id, cert, key) in &self.nodes {
            writeln!(
                f,
                "  gateway {id}: --node-id {id}{cluster} --peer-tls-ca {} --peer-tls-cert {} \
                 --peer-tls-key {}",
                self.ca.0.display(),
                cert.display(),
                key.display()
            )?;
        }
        Ok(())
    }
}

/// Parses `1,2,3` into distinct non-zero ids.
fn parse_nodes(s: &str) -> Result<Vec<u64>, String> {
    let mut ids = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let id: u64 = part
            .parse()
            .map_err(|_| format!("--nodes: {part:?} is not a node id"))?;
        if id == 0 || ids.contains(&id) {
            return Err(format!("--nodes: node id {id} is 0 or given twice"));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Err("--nodes is empty".into());
    }
    Ok(ids)
}

/// Days since 1970-01-01 as (year, month, day) (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as i32, month as u8, day as u8)
}

/// Valid from yesterday (clocks differ a little) for ten years.
fn set_validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let today = i64::try_from(now / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    // 28th at the latest: every month has one.
    params.not_after = rcgen::date_time_ymd(y + 10, m, d.min(28));
}

/// Writes `text` to a new file `path`, mode 0600; refuses an existing file.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(crate::files::FILE_MODE);
    }
    let mut f = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{} exists already; not overwritten", path.display())
        } else {
            format!("cannot create {}: {e}", path.display())
        }
    })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Makes the CA and the gateways' certificates into `args.out`.
pub fn make(args: &CertsArgs) -> Result<Written, String> {
    let ids = parse_nodes(&args.nodes)?;
    let cluster_id = args.cluster_id.clone();
    for &id in &ids {
        let name = peer_tls_name(&cluster_id, id);
        match rustls_pki_types::ServerName::try_from(name.as_str()) {
            Ok(rustls_pki_types::ServerName::DnsName(_)) => {}
            _ => {
                return Err(format!(
                    "--cluster-id {cluster_id:?}: with peer TLS the cluster id must be usable in \
                     a DNS name (letters, digits, '-' and '.'), and {name:?} is not one"
                ));
            }
        }
    }
    let out = &args.out;
    crate::files::create_private_dir(out)
        .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    // Nothing is written if any file is there already.
    let ca_cert = out.join("ca.pem");
    let ca_key = out.join("ca.key");
    let node_files: Vec<(u64, PathBuf, PathBuf)> = ids
        .iter()
        .map(|id| {
            (
                *id,
                out.join(format!("node-{id}.pem")),
                out.join(format!("node-{id}.key")),
            )
        })
        .collect();
    for path in [&ca_cert, &ca_key]
        .into_iter()
        .chain(node_files.iter().flat_map(|(_, c, k)| [c, k]))
    {
        if path.exists() {
            return Err(format!(
                "{} exists already; not overwritten (choose another --out)",
                path.display()
            ));
        }
    }
    let err = |what: &str, e: rcgen::Error| format!("making {what}: {e}");
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err("the CA", e))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Entente cluster {cluster_id} CA"),
    );
    set_validity(&mut params);
    let ca_keys = KeyPair::generate().map_err(|e| err("the CA key", e))?;
    let ca_key_pem = ca_keys.serialize_pem();
    let ca = CertifiedIssuer::self_signed(params, ca_keys).map_err(|e| err("the CA", e))?;
    write_private(&ca_key, &ca_key_pem)?;
    write_private(&ca_cert, &ca.pem())?;
    for (id, cert_path, key_path) in &node_files {
        let name = peer_tls_name(&cluster_id, *id);
        let mut params = CertificateParams::new(vec![name.clone()]).map_err(|e| err(&name, e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params);
        let key = KeyPair::generate().map_err(|e| err(&name, e))?;
        let cert = params.signed_by(&key, &ca).map_err(|e| err(&name, e))?;
        write_private(key_path, &key.serialize_pem())?;
        write_private(cert_path, &cert.pem())?;
    }
    Ok(Written {
        ca: (ca_cert, ca_key),
        nodes: node_files,
        cluster_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_come_out_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }

    #[test]
    fn node_lists_are_checked() {
        assert_eq!(parse_nodes("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert!(parse_nodes("1,1").is_err());
        assert!(parse_nodes("0").is_err());
        assert!(parse_nodes("x").is_err());
        assert!(parse_nodes("").is_err());
    }
}
