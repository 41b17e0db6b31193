//! `gateway verify-certificate`: checks a write's commit certificate (the
//! `Entente-Certificate` header a PBFT group's gateway answers a write
//! with) against the group's public keys alone — no gateway is asked — and
//! says what it proves.

use std::io::Read;

use coordinator::pbft::certificate::{self, Verified};

use crate::config::VerifyArgs;
use crate::ops::Proposal;

/// The proposal header the node driver puts before a write's bytes (node,
/// incarnation, sequence number).
const PROPOSAL_HEADER: usize = 24;

/// Most bytes read from standard input.
const MAX_INPUT: u64 = 256 * 1024;

/// Runs the subcommand: the report of a valid certificate, or why it is
/// not one.
pub fn run(args: &VerifyArgs) -> Result<String, String> {
    let group = coordinator::keys::parse_group_keys(&args.group_keys)
        .map_err(|e| format!("--group-keys: {e}"))?;
    let value = if args.certificate == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(MAX_INPUT)
            .read_to_string(&mut s)
            .map_err(|e| format!("reading the certificate from standard input: {e}"))?;
        s
    } else {
        args.certificate.clone()
    };
    // Accept the header line as curl prints it, too.
    let value = value.trim();
    let value = value
        .split_once(':')
        .filter(|(name, _)| name.eq_ignore_ascii_case(certificate::HEADER))
        .map_or(value, |(_, v)| v.trim());
    let document = certificate::from_header(value).map_err(|e| e.to_string())?;
    let v = certificate::verify(&document, &group).map_err(|e| e.to_string())?;
    Ok(report(&v))
}

/// What a verified certificate proves, for a person.
pub fn report(v: &Verified) -> String {
    let signers: Vec<String> = v.signers.iter().map(u64::to_string).collect();
    let mut out = format!(
        "valid: the group committed this write at log index {} (request {} of gateway {}), \
         signed by members {} — f+1 = {} needed, so at least one is correct\n\
         history after it: {}\n",
        v.index,
        v.ts,
        v.client,
        signers.join(", "),
        v.faults + 1,
        certificate::hex(&v.history),
    );
    match &v.data {
        Some(data) => match decode_write(data) {
            Some(json) => out.push_str(&format!("the write: {json}\n")),
            None => out.push_str(&format!(
                "the write: {} bytes that are not a gateway operation\n",
                data.len()
            )),
        },
        None => out.push_str(&format!(
            "the write: {} bytes, left out of the certificate (check them with its request digest {})\n",
            v.data_len,
            certificate::hex(&v.request)
        )),
    }
    out
}

/// The gateway operation a certified write carries, as JSON.
fn decode_write(data: &[u8]) -> Option<String> {
    let p = Proposal::decode(data.get(PROPOSAL_HEADER..)?).ok()?;
    serde_json::to_string(&p).ok()
}
