//! Function names per user (issue 13): two users may own the same name; the
//! call URL finds a function by its secret, and a 409 is only for the
//! caller's own names. The same flow runs on the NATS backend in
//! `tests/cluster.rs`.

mod common;

use common::*;

#[test]
fn two_users_can_own_the_same_function_name() {
    let d = Daemon::start();
    scope::two_users_own_one_name(&d, &d);
    d.finish();
}
