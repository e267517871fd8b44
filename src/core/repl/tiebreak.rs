//! Crossed connects: when both nodes connect to each other at once, which of the two
//! connections survives.
//!
//! Rule: the connection initiated by the node with the lower node id survives. Both
//! nodes compute the same answer from facts they share (the two ids and who dialled),
//! without talking, and the answer does not depend on timing. Apply it only to
//! connections whose handshake reached `Established`: an unauthenticated connection
//! must never displace anything, or anyone could break the mirror link by dialling in.

/// Who opened (dialled) a connection, from the point of view of the node asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    Local,
    Peer,
}

/// Of two crossed connections between `local_id` and `peer_id`, which one survives: the
/// one initiated by the lower node id.
pub fn crossed_connect_survivor(local_id: u32, peer_id: u32) -> Initiator {
    assert_ne!(local_id, peer_id, "a node does not connect to itself");
    if local_id < peer_id {
        Initiator::Local
    } else {
        Initiator::Peer
    }
}

/// Whether to keep a connection initiated by `initiator` when a crossed connection with
/// the same peer exists. The loser is closed with a Refuse(DuplicateConnection).
pub fn keep_connection(local_id: u32, peer_id: u32, initiator: Initiator) -> bool {
    crossed_connect_survivor(local_id, peer_id) == initiator
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both nodes look at the same two physical connections (A dialled B; B dialled A)
    /// and must keep the same one, whichever node has the lower id.
    fn both_views_agree(a: u32, b: u32) {
        // Connection 1: dialled by A. A sees Local, B sees Peer.
        let keep_1_at_a = keep_connection(a, b, Initiator::Local);
        let keep_1_at_b = keep_connection(b, a, Initiator::Peer);
        // Connection 2: dialled by B.
        let keep_2_at_a = keep_connection(a, b, Initiator::Peer);
        let keep_2_at_b = keep_connection(b, a, Initiator::Local);
        assert_eq!(keep_1_at_a, keep_1_at_b, "nodes disagree on connection 1");
        assert_eq!(keep_2_at_a, keep_2_at_b, "nodes disagree on connection 2");
        assert!(keep_1_at_a ^ keep_2_at_a, "exactly one connection survives");
        // The survivor is the one the lower id dialled.
        assert_eq!(keep_1_at_a, a < b);
    }

    #[test]
    fn lower_id_initiated_connection_survives_in_both_orders() {
        both_views_agree(1, 2);
        both_views_agree(2, 1);
        both_views_agree(0, u32::MAX);
        both_views_agree(u32::MAX, 0);
    }

    #[test]
    fn survivor_is_named_from_each_side() {
        assert_eq!(crossed_connect_survivor(1, 2), Initiator::Local);
        assert_eq!(crossed_connect_survivor(2, 1), Initiator::Peer);
    }

    #[test]
    #[should_panic(expected = "does not connect to itself")]
    fn equal_ids_are_a_bug() {
        crossed_connect_survivor(3, 3);
    }
}
