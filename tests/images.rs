//! Which images a user may run (issue 20, point 5): a reference must name a
//! repository, since the Engine resolves an image ID or a digest alone to
//! whatever local image has it; a local image counts as from the registry
//! its name says; and a user may use the image of a function of their own
//! after its registry left the allow-list, while nobody else gains it.
//! Everything here is local to the shared Engine: nothing is pulled.

mod common;

use common::scope::send_as;
use common::*;
use std::process::Command;

/// The full ID of the test image, without `sha256:`.
fn image_id() -> String {
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Id}}", test_image()])
        .output()
        .expect("docker image inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    id.strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("unexpected image id {id:?}"))
        .to_string()
}

/// Every way of naming the test image by its ID or digest alone.
fn id_references() -> Vec<String> {
    let id = image_id();
    vec![
        id[..12].to_string(),
        id[..4].to_string(),
        id.clone(),
        format!("sha256:{id}"),
        format!("sha256:{}", &id[..12]),
    ]
}

/// A create of `image` as `key` through the API: (status, JSON).
fn create(d: &Daemon, key: &str, name: &str, image: &str) -> (u16, serde_json::Value) {
    send_as(
        d,
        key,
        "POST",
        "/v1/functions",
        &format!(r#"{{"Name":"{name}","Image":"{image}","Command":["cat"]}}"#),
    )
}

fn assert_refused(got: (u16, serde_json::Value), what: &str, words: &str) {
    let (code, v) = got;
    assert_eq!(code, 400, "{what}: {v}");
    assert_eq!(v["error"]["code"], "image_not_allowed", "{what}: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(words), "{what}: {message:?}");
}

/// The names of the functions `key`'s user has.
fn names(d: &Daemon, key: &str) -> Vec<String> {
    let (code, v) = scope::api_as(d, key, "GET", "/v1/functions");
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["Name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn image_ids_and_digests_alone_are_refused_unless_admins_may_use_anything() {
    // The helper's config has network mode none and no warm pool.
    let mut d = Daemon::start();
    let tenant = d.add_user("tenant", 2);
    let admin = d.admin_key();
    d.create_as(&tenant, "named", &[IMAGE, "cat"]);

    for r in id_references() {
        for (who, key) in [("tenant", &tenant), ("admin", &admin)] {
            assert_refused(
                create(&d, key, "byid", &r),
                &format!("{who} creates from {r}"),
                "names no repository",
            );
        }
        // Nor by an update of a function of one's own.
        assert_refused(
            send_as(
                &d,
                &tenant,
                "PATCH",
                "/v1/functions/named",
                &format!(r#"{{"Image":"{r}"}}"#),
            ),
            &format!("update to {r}"),
            "names no repository",
        );
    }
    // The CLI says so on one line.
    let short = &image_id()[..12];
    let out = d.cli_as(
        &tenant,
        &["func", "create", "--name", "byid", short, "cat"],
        None,
    );
    assert_cli_error(&out, "names no repository");
    // Nothing was stored or changed.
    assert_eq!(names(&d, &tenant), ["named"]);
    let (_, all) = d.api("/v1/functions?owner=admin");
    assert_eq!(all, serde_json::json!([]), "the admin got nothing");
    assert_eq!(d.inspect("named")["Image"], IMAGE);
    // An admin may use anything with admin_any, and the call runs that
    // image; tenants still may not.
    d.restart_with("[images]\nadmin_any = true\n");
    let (code, v) = create(&d, &admin, "byid", short);
    assert_eq!(code, 201, "{v}");
    let out = d.cli_stdin(&["func", "call", "--sync", "byid"], Some(b"by id"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "by id");
    assert_refused(
        create(&d, &tenant, "byid", short),
        "tenant with admin_any",
        "names no repository",
    );
    d.finish();
}

/// The test image under a name whose registry is `127.0.0.1:5999` (nothing
/// listens there: the image is only ever local), untagged again on drop.
struct PrivateTag(String);

impl PrivateTag {
    fn new() -> PrivateTag {
        let name = format!("127.0.0.1:5999/hf-private-{}/secret:1", std::process::id());
        let out = Command::new("docker")
            .args(["tag", test_image(), &name])
            .output()
            .expect("docker tag");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PrivateTag(name)
    }
}

impl Drop for PrivateTag {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", &self.0]).output();
    }
}

#[test]
fn a_user_keeps_their_own_image_from_an_unlisted_registry_and_nobody_else_gets_it() {
    let private = PrivateTag::new();
    let image = private.0.as_str();
    let listed = "[images]\nregistries = [\"docker.io\", \"127.0.0.1:5999\"]\n";
    let mut d = Daemon::start_with(listed);
    let alice = d.add_user("alice", 2);
    let bob = d.add_user("bob", 2);
    let admin = d.admin_key();
    d.create_as(&alice, "priv", &[image, "cat"]);

    // The operator takes the registry off the list.
    d.restart_with("");
    // Alice's function still runs, and she may update, refresh and copy it.
    let sync = |key: &str, name: &str, payload: &[u8]| {
        let out = d.cli_as(key, &["func", "call", "--sync", name], Some(payload));
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(sync(&alice, "priv", b"mine"), "mine");
    let out = d.cli_as(
        &alice,
        &["func", "update", "priv", "--refresh", "-e", "A=1"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, v) = create(&d, &alice, "priv2", image);
    assert_eq!(code, 201, "{v}");
    assert_eq!(sync(&alice, "priv2", b"copy"), "copy");

    // Bob gets it by no spelling: not by its name, not by its ID, not by
    // an update of a function of his own; nor does the admin, who has no
    // function from it.
    assert_refused(
        create(&d, &bob, "steal", image),
        "bob by name",
        "images from 127.0.0.1:5999 are not allowed",
    );
    for r in id_references() {
        assert_refused(create(&d, &bob, "steal", &r), &r, "names no repository");
    }
    d.create_as(&bob, "mine", &[IMAGE, "cat"]);
    assert_refused(
        send_as(
            &d,
            &bob,
            "PATCH",
            "/v1/functions/mine",
            &format!(r#"{{"Image":"{image}"}}"#),
        ),
        "bob's update",
        "not allowed",
    );
    assert_refused(
        create(&d, &admin, "steal", image),
        "admin by name",
        "not allowed",
    );
    assert_eq!(names(&d, &bob), ["mine"]);
    let (_, v) = scope::api_as(&d, &bob, "GET", "/v1/functions/mine");
    assert_eq!(v["Image"], IMAGE, "{v}");
    d.finish();
}
