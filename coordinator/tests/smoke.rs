//! A first end-to-end check of the in-memory driver.
use consensus::memory::Network;
use coordinator::raft::Role;

#[test]
fn three_nodes_elect_replicate_and_apply() {
    let mut net = Network::paper(&[1, 2, 3]);
    net.campaign(1);
    assert_eq!(net.raft(1).role(), Role::Leader);
    net.propose(1, b"x").unwrap();
    net.propose(2, b"y").unwrap();
    for id in [1, 2, 3] {
        let applied: Vec<&[u8]> = net
            .node(id)
            .applied()
            .iter()
            .map(|(_, d)| d.as_slice())
            .collect();
        assert_eq!(applied, vec![&b"x"[..], &b"y"[..]], "node {id}");
    }
}
