//! Promises every backend keeps, checked the same way on each
//! (`embedded/tests.rs` and `nats/tests.rs`, on a real nats-server, call
//! these): what a test of one backend alone would let drift apart.

use super::Store;
use crate::model::PulledImage;

fn image(instance: &str, id: &str, unused_since_ms: Option<u64>) -> PulledImage {
    PulledImage {
        instance: instance.into(),
        id: id.into(),
        repository: "registry.example.com/team/app".into(),
        pulled_ms: 1_000,
        unused_since_ms,
    }
}

fn sorted(mut v: Vec<PulledImage>) -> Vec<PulledImage> {
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

/// The images a daemon pulled: kept per instance (an instance whose name
/// starts another's sees only its own), a second put of an image replaces
/// it (the sweep's `unused_since_ms`), a delete takes one image of one
/// instance only.
pub async fn pulled_images(store: &dyn Store) {
    let (a, b) = ("node-1", "node-10");
    assert_eq!(store.pulled_images(a).await.unwrap(), Vec::new());
    let one = image(a, "sha256:1111", None);
    let two = image(a, "sha256:2222", None);
    let theirs = image(b, "sha256:1111", None);
    for i in [&one, &two, &theirs] {
        store.put_pulled_image(i).await.unwrap();
    }
    assert_eq!(
        sorted(store.pulled_images(a).await.unwrap()),
        vec![one.clone(), two.clone()]
    );
    assert_eq!(store.pulled_images(b).await.unwrap(), vec![theirs.clone()]);
    let unused = image(a, "sha256:2222", Some(5_000));
    store.put_pulled_image(&unused).await.unwrap();
    assert_eq!(
        sorted(store.pulled_images(a).await.unwrap()),
        vec![one.clone(), unused]
    );
    store.delete_pulled_image(a, "sha256:1111").await.unwrap();
    // Deleting what is not there is no error (a sweep retried).
    store.delete_pulled_image(a, "sha256:1111").await.unwrap();
    assert_eq!(
        store
            .pulled_images(a)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect::<Vec<_>>(),
        ["sha256:2222"]
    );
    assert_eq!(store.pulled_images(b).await.unwrap(), vec![theirs]);
}
