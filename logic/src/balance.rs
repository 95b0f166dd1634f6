//! Power-of-two-choices ranking of gateways for `GET /v1/gateways`: each
//! position is filled by drawing two of the remaining gateways at random and
//! taking the less loaded one. Clients connect to the first, so load
//! spreads without every client piling onto the single least-loaded host.

use rand::Rng;
use switchboard_storage::Member;

/// The load figure compared: CPU first, connections as a tie-breaker.
fn score(m: &Member) -> f64 {
    m.load as f64 + m.connections as f64 * 1e-9
}

/// Orders `members` by repeated power-of-two-choices.
pub fn p2c_order(mut members: Vec<Member>, rng: &mut impl Rng) -> Vec<Member> {
    let mut out = Vec::with_capacity(members.len());
    while members.len() > 1 {
        let a = rng.gen_range(0..members.len());
        let mut b = rng.gen_range(0..members.len() - 1);
        if b >= a {
            b += 1;
        }
        let pick = if score(&members[a]) <= score(&members[b]) { a } else { b };
        out.push(members.swap_remove(pick));
    }
    out.extend(members);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, load: f32) -> Member {
        Member { id: id.into(), rpc: id.into(), ws: id.into(), tcp: String::new(), load, connections: 0 }
    }

    #[test]
    fn two_gateways_lighter_first() {
        let mut rng = rand::thread_rng();
        for _ in 0..50 {
            let order = p2c_order(vec![m("busy", 0.9), m("idle", 0.1)], &mut rng);
            assert_eq!(order[0].id, "idle");
        }
    }

    #[test]
    fn busiest_never_first_and_all_kept() {
        let mut rng = rand::thread_rng();
        let mut firsts = std::collections::HashMap::new();
        for _ in 0..2000 {
            let order = p2c_order(vec![m("a", 0.1), m("b", 0.2), m("c", 0.3), m("d", 0.95)], &mut rng);
            assert_eq!(order.len(), 4);
            *firsts.entry(order[0].id.clone()).or_insert(0) += 1;
        }
        assert!(!firsts.contains_key("d"), "the busiest can never win a pair: {firsts:?}");
        assert!(firsts["a"] > firsts["b"] && firsts["b"] > firsts["c"], "{firsts:?}");
    }

    #[test]
    fn empty_and_single() {
        let mut rng = rand::thread_rng();
        assert!(p2c_order(vec![], &mut rng).is_empty());
        assert_eq!(p2c_order(vec![m("x", 1.0)], &mut rng).len(), 1);
    }
}
