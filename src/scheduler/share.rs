//! How `host_max_running` is shared between users: the slots reserved for
//! some of them, and which waiting owner gets a slot that frees. Pure
//! arithmetic over the dispatcher's counts, no I/O: the dispatcher keeps a
//! `Shares` (the reservations in force, reloaded only when users change)
//! and asks it on every turn.
//!
//! The rule (README "Sharing the host"): an owner may start a call when
//! the host has a free slot and either the owner runs fewer calls than
//! their reservation (a slot of their own), or starting it leaves every
//! other user's unused reservation free:
//! `running_total + 1 + Σ_{V≠U} max(0, reserved_V − running_V) ≤ host_max_running`.
//! Reservations count whether or not their user has calls queued: that is
//! what lets an idle admin's call start at once on a full host. While the
//! reservations leave at least one slot unreserved, `running_total +
//! Σ_V max(0, reserved_V − running_V) ≤ host_max_running` holds after
//! every start, so an owner below their reservation always finds a free
//! slot (only a reservation raised while calls run can delay it until
//! some end).

use crate::model::Name;
use std::collections::{HashMap, HashSet, VecDeque};

/// The reservations in force: per user, the slots kept for them, at most
/// `host_max_running - 1` in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shares {
    /// Only users with at least one slot.
    reserved: HashMap<Name, u32>,
}

/// A reservation that did not fit: who asked for how many, and how many
/// they got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub user: Name,
    pub wanted: u32,
    pub granted: u32,
}

/// What a user asks to have kept (`User::reserved`), and whether they are
/// an admin (admins are served first when the asks do not fit).
#[derive(Debug, Clone)]
pub struct Want {
    pub user: Name,
    pub admin: bool,
    pub reserved: u32,
}

impl Shares {
    /// The reservations `wants` ask for, within `host_cap - 1` in all. If
    /// they ask for more (a lowered `host_max_running`, a changed default,
    /// or two concurrent `user add`s), admins are served first, then the
    /// others in name order, each up to what is left; the cuts say who got
    /// less than they asked.
    pub fn new(mut wants: Vec<Want>, host_cap: u32) -> (Shares, Vec<Cut>) {
        wants.sort_by(|a, b| b.admin.cmp(&a.admin).then_with(|| a.user.cmp(&b.user)));
        let mut left = host_cap.saturating_sub(1);
        let mut reserved = HashMap::new();
        let mut cuts = Vec::new();
        for w in wants {
            let granted = w.reserved.min(left);
            left -= granted;
            if granted < w.reserved {
                cuts.push(Cut {
                    user: w.user.clone(),
                    wanted: w.reserved,
                    granted,
                });
            }
            if granted > 0 {
                reserved.insert(w.user, granted);
            }
        }
        (Shares { reserved }, cuts)
    }

    pub fn reserved(&self, user: &Name) -> u32 {
        self.reserved.get(user).copied().unwrap_or(0)
    }

    /// Reserved slots not in use now, all users together.
    pub fn unused(&self, running: &HashMap<Name, u32>) -> u32 {
        self.reserved
            .iter()
            .map(|(u, r)| r.saturating_sub(running.get(u).copied().unwrap_or(0)))
            .sum()
    }

    /// Whether `owner` may start one more call now (their quota aside),
    /// where `unused` is `self.unused(running)`.
    pub fn may_start(
        &self,
        owner: &Name,
        running: &HashMap<Name, u32>,
        running_total: u32,
        unused: u32,
        host_cap: u32,
    ) -> bool {
        if running_total >= host_cap {
            return false;
        }
        let mine = self.reserved(owner);
        let runs = running.get(owner).copied().unwrap_or(0);
        if runs < mine {
            return true;
        }
        // The owner's own reservation is all in use: every unused one is
        // someone else's.
        u64::from(running_total) + 1 + u64::from(unused) <= u64::from(host_cap)
    }

    /// Which of the `ready` owners (round-robin order) gets the next slot,
    /// as an index into `ready`: of those not `passed` over this pass and
    /// allowed to start, the one running the fewest calls (max-min: a freed
    /// slot goes to whoever holds least), the earliest in `ready` among
    /// equals (round-robin). `None`: nobody may start now.
    pub fn pick(
        &self,
        ready: &VecDeque<Name>,
        passed: &HashSet<Name>,
        running: &HashMap<Name, u32>,
        running_total: u32,
        host_cap: u32,
    ) -> Option<usize> {
        if running_total >= host_cap {
            return None;
        }
        let unused = self.unused(running);
        let mut best: Option<(usize, u32)> = None;
        for (i, owner) in ready.iter().enumerate() {
            if passed.contains(owner)
                || !self.may_start(owner, running, running_total, unused, host_cap)
            {
                continue;
            }
            let runs = running.get(owner).copied().unwrap_or(0);
            if best.is_none_or(|(_, fewest)| runs < fewest) {
                best = Some((i, runs));
                if runs == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn want(user: &str, admin: bool, reserved: u32) -> Want {
        Want {
            user: n(user),
            admin,
            reserved,
        }
    }

    fn shares(wants: &[(&str, bool, u32)], cap: u32) -> Shares {
        let (s, cuts) = Shares::new(wants.iter().map(|(u, a, r)| want(u, *a, *r)).collect(), cap);
        assert!(cuts.is_empty(), "{cuts:?}");
        s
    }

    fn counts(c: &[(&str, u32)]) -> HashMap<Name, u32> {
        c.iter().map(|(u, k)| (n(u), *k)).collect()
    }

    /// The dispatcher's loop in miniature: starts calls of `queued`
    /// owners (each with `quota`) until nobody may, as `pick` chooses.
    fn fill(
        s: &Shares,
        running: &mut HashMap<Name, u32>,
        queued: &[&str],
        quota: u32,
        cap: u32,
    ) -> Vec<String> {
        let mut ready: VecDeque<Name> = queued.iter().map(|u| n(u)).collect();
        let mut passed = HashSet::new();
        let mut started = Vec::new();
        loop {
            let total = running.values().sum();
            let Some(i) = s.pick(&ready, &passed, running, total, cap) else {
                break;
            };
            let owner = ready.remove(i).unwrap();
            let runs = running.entry(owner.clone()).or_default();
            if *runs >= quota {
                passed.insert(owner.clone());
            } else {
                *runs += 1;
                started.push(owner.to_string());
            }
            ready.push_back(owner);
        }
        started
    }

    /// The scenario: host 4, two quota-2 tenants filling it while
    /// the admin (1 reserved) is idle. They get 3 slots, and the admin's
    /// call then starts at once.
    #[test]
    fn an_idle_admins_reservation_is_kept_from_tenants() {
        let s = shares(&[("admin", true, 1)], 4);
        let mut running = HashMap::new();
        let started = fill(&s, &mut running, &["alice", "bob"], 2, 4);
        assert_eq!(started, ["alice", "bob", "alice"]);
        assert_eq!(running, counts(&[("alice", 2), ("bob", 1)]));
        let started = fill(&s, &mut running, &["bob", "admin"], 2, 4);
        assert_eq!(started, ["admin"], "bob waits, the admin runs");
        assert_eq!(running.values().sum::<u32>(), 4);
    }

    /// A tenant cannot take more than the host minus the others' unused
    /// reservations, whatever their quota.
    #[test]
    fn a_tenant_stops_at_the_host_minus_others_reservations() {
        let s = shares(&[("admin", true, 1), ("carol", false, 2)], 8);
        let mut running = HashMap::new();
        let started = fill(&s, &mut running, &["greedy"], 100, 8);
        assert_eq!(started.len(), 5, "8 - 1 - 2");
        // Carol's own reservation: both start although the host has only
        // her two slots and the admin's left.
        assert_eq!(fill(&s, &mut running, &["carol"], 10, 8).len(), 2);
        assert_eq!(fill(&s, &mut running, &["carol"], 10, 8).len(), 0);
        assert_eq!(fill(&s, &mut running, &["admin"], 10, 8).len(), 1);
        assert_eq!(running.values().sum::<u32>(), 8);
    }

    /// A user with a reservation may also use unreserved slots, beyond
    /// their own, as long as the others' stay free.
    #[test]
    fn a_reserved_user_uses_free_slots_beyond_their_own() {
        let s = shares(&[("admin", true, 1), ("carol", false, 1)], 4);
        let mut running = HashMap::new();
        assert_eq!(fill(&s, &mut running, &["carol"], 10, 4), ["carol"; 3]);
        assert_eq!(fill(&s, &mut running, &["alice"], 10, 4).len(), 0);
        assert_eq!(fill(&s, &mut running, &["admin"], 10, 4).len(), 1);
    }

    /// When one slot frees and several owners wait, the one holding the
    /// fewest gets it, not the next in round-robin order.
    #[test]
    fn a_freed_slot_goes_to_the_owner_holding_fewest() {
        let s = Shares::default();
        let mut running = counts(&[("alice", 3), ("bob", 0)]);
        // Alice is first in line, but bob holds nothing.
        assert_eq!(fill(&s, &mut running, &["alice", "bob"], 10, 4), ["bob"]);
        let mut running = counts(&[("alice", 1), ("bob", 2), ("carol", 1)]);
        // Alice and carol both hold one: round-robin order breaks the tie.
        assert_eq!(
            fill(&s, &mut running, &["carol", "bob", "alice"], 10, 6),
            ["carol", "alice"]
        );
    }

    /// Without reservations the host fills round-robin up to its cap, as
    /// before reservations existed.
    #[test]
    fn without_reservations_the_host_fills_round_robin() {
        let s = Shares::default();
        let mut running = HashMap::new();
        let started = fill(&s, &mut running, &["a", "b", "c"], 10, 7);
        assert_eq!(started, ["a", "b", "c", "a", "b", "c", "a"]);
        assert_eq!(fill(&s, &mut running, &["d"], 10, 7).len(), 0);
    }

    /// Reservations asking for more than the host leaves are cut: admins
    /// first, then by name, and at least one slot stays unreserved.
    #[test]
    fn reservations_over_the_host_are_cut_admins_first() {
        let (s, cuts) = Shares::new(
            vec![
                want("zed", false, 2),
                want("bob", false, 2),
                want("root", true, 1),
                want("amy", false, 0),
            ],
            4,
        );
        assert_eq!(s.reserved(&n("root")), 1);
        assert_eq!(s.reserved(&n("bob")), 2);
        assert_eq!(s.reserved(&n("zed")), 0);
        assert_eq!(
            cuts,
            [Cut {
                user: n("zed"),
                wanted: 2,
                granted: 0
            }]
        );
        // A host of one slot keeps none.
        let (s, cuts) = Shares::new(vec![want("root", true, 1)], 1);
        assert_eq!(s, Shares::default());
        assert_eq!(cuts.len(), 1);
        assert_eq!(s.unused(&HashMap::new()), 0);
    }

    /// The invariant the rule keeps: with every start allowed by
    /// `may_start`, the running calls plus the unused reservations never
    /// exceed the host, so a user below their reservation can always start.
    #[test]
    fn running_plus_unused_reservations_never_exceed_the_host() {
        let s = shares(&[("admin", true, 1), ("a", false, 2), ("b", false, 1)], 6);
        let users = ["admin", "a", "b", "c", "d"];
        let mut running: HashMap<Name, u32> = HashMap::new();
        // A fixed pseudo-random walk of starts and ends.
        let mut x: u32 = 7;
        for _ in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let u = n(users[(x >> 8) as usize % users.len()]);
            let total: u32 = running.values().sum();
            if (x >> 4) % 3 == 0 {
                if let Some(r) = running.get_mut(&u).filter(|r| **r > 0) {
                    *r -= 1;
                }
            } else if s.may_start(&u, &running, total, s.unused(&running), 6) {
                *running.entry(u.clone()).or_default() += 1;
            } else {
                assert!(
                    running.get(&u).copied().unwrap_or(0) >= s.reserved(&u),
                    "a user below their reservation was refused: {running:?}"
                );
            }
            let total: u32 = running.values().sum();
            assert!(total + s.unused(&running) <= 6, "{running:?}");
        }
    }
}
