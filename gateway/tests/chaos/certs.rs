//! Commit certificates: a PBFT gateway answers a write with an
//! `Entente-Certificate` header, proof checkable with the group's public
//! keys alone that f+1 members executed the request. The clients record
//! every one they get with a successful answer (`workload.rs`); [`check`]
//! verifies them all once the run is over. One that does not verify is a
//! violation: a correct gateway vouched for an execution the group did not
//! sign.

use std::collections::BTreeMap;

use coordinator::pbft::certificate;

use super::workload::Certificate;

/// Verifies every recorded certificate with the group's keys; a failure is
/// a violation naming the request it came with. Returns how many verified.
pub fn check(
    recorded: &[Certificate],
    group: &BTreeMap<u64, [u8; 32]>,
    violations: &mut Vec<String>,
) -> usize {
    let mut verified = 0;
    let mut failed = 0;
    for c in recorded {
        let outcome = certificate::from_header(&c.header)
            .and_then(|document| certificate::verify(&document, group));
        match outcome {
            Ok(_) => verified += 1,
            Err(e) => {
                failed += 1;
                if failed <= 5 {
                    violations.push(format!(
                        "the commit certificate of {} does not verify with the group's keys: {e}",
                        c.what
                    ));
                }
            }
        }
    }
    if failed > 5 {
        violations.push(format!(
            "… {failed} of {} commit certificates do not verify in all",
            recorded.len()
        ));
    }
    verified
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use coordinator::keys::NodeKey;
    use coordinator::pbft::certificate::{CommitCertificate, SignatureEntry};
    use coordinator::pbft::{Reply, Signed};

    const DATA: &[u8] = b"a replicated operation";

    fn group() -> BTreeMap<u64, [u8; 32]> {
        (1..=4)
            .map(|id| (id, NodeKey::from_seed([id as u8; 32]).public()))
            .collect()
    }

    /// The header of a certificate for index 42 signed by `signers` (each
    /// with its own key, as the engine's replies are: one REPLY whose
    /// Merkle tree holds this request's leaf alone).
    fn header(signers: &[u64]) -> String {
        let group = group();
        let (client, ts, index) = (2, 7, 42);
        let request = certificate::request_digest(client, ts, DATA);
        let history = [9; 32];
        let leaf = certificate::leaf_hash(client, index, ts, &request, &history);
        let reply = Reply {
            view: 0,
            client,
            first: index,
            last: index,
            root: leaf,
            count: 1,
        };
        let signatures = signers
            .iter()
            .map(|&node| {
                let crypto = NodeKey::from_seed([node as u8; 32])
                    .crypto(node, &group)
                    .expect("keys");
                let signed = Signed::sign(crypto.as_ref(), node, reply.clone());
                SignatureEntry {
                    node,
                    view: 0,
                    first: index,
                    last: index,
                    count: 1,
                    position: 0,
                    path: Vec::new(),
                    sig: certificate::hex(&signed.sig),
                }
            })
            .collect();
        let doc = CommitCertificate {
            version: certificate::VERSION,
            index,
            client,
            ts,
            request: certificate::hex(&request),
            history: certificate::hex(&history),
            data_len: DATA.len() as u64,
            data: Some(base64::engine::general_purpose::STANDARD.encode(DATA)),
            signatures,
        };
        certificate::to_header(&serde_json::to_vec(&doc).expect("json"))
    }

    fn recorded(header: String) -> Certificate {
        Certificate {
            what: "POST /v1/devices on gw2".into(),
            header,
        }
    }

    /// A certificate f+1 members signed verifies and is no violation; one
    /// with a single signer, one signed by a key outside the group, one
    /// altered after signing and one that is not base64url are each a
    /// violation naming the request.
    #[test]
    fn recorded_certificates_are_verified_with_the_groups_keys() {
        let group = group();
        let mut violations = Vec::new();
        let good = recorded(header(&[2, 3]));
        assert_eq!(
            check(std::slice::from_ref(&good), &group, &mut violations),
            1
        );
        assert!(violations.is_empty(), "{violations:?}");

        let too_few = recorded(header(&[3]));
        let mut other_group = group.clone();
        other_group.insert(3, NodeKey::from_seed([77; 32]).public());
        let document = certificate::from_header(&good.header).expect("base64url");
        let mut doc: CommitCertificate = serde_json::from_slice(&document).expect("json");
        doc.index += 1;
        let altered = recorded(certificate::to_header(
            &serde_json::to_vec(&doc).expect("json"),
        ));
        let garbage = recorded("not a certificate!".into());
        let all = [good.clone(), too_few, altered, garbage];
        assert_eq!(check(&all, &group, &mut violations), 1);
        assert_eq!(violations.len(), 3, "{violations:?}");
        assert!(
            violations
                .iter()
                .all(|v| v.contains("POST /v1/devices on gw2") && v.contains("does not verify")),
            "{violations:?}"
        );
        // The good one checked against other keys fails too.
        let mut violations = Vec::new();
        assert_eq!(check(&[good], &other_group, &mut violations), 0);
        assert_eq!(violations.len(), 1, "{violations:?}");
    }
}
