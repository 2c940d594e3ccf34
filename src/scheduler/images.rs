//! The images functions run: a cold call's pinned image pulled again when
//! it is gone from the Engine (with the owner's login), functions stored
//! before digests were pinned pinned at start, and the removal of images
//! hyperfuncd pulled once no function has used them for `[images]
//! gc_after`. The sweep runs on a task of its own, never in the dispatch
//! loop; what it has decided (since when an image is unused) is in the
//! store, so a pending removal survives a restart. It never removes an
//! image it did not pull, one a function uses, or one a container uses.

use super::Scheduler;
use crate::model::{FnKey, Function, Name, PulledImage, RegistryLogin};
use crate::runtime::{repository_of, ImageRemoval, PullAuth, Resolved, RuntimeError};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Records that `resolved` (what `image` named) came onto `instance`'s
/// Engine by a pull of hyperfuncd's, or, for an image it pulled before,
/// that a function uses it again.
pub async fn note_pulled(
    store: &dyn Store,
    instance: &str,
    image: &str,
    resolved: &Resolved,
) -> Result<(), StoreError> {
    let Some(repository) = repository_of(image) else {
        // An image ID names no repository: nothing was pulled.
        return Ok(());
    };
    store
        .put_pulled_image(&PulledImage {
            instance: instance.to_string(),
            id: resolved.id.clone(),
            repository,
            pulled_ms: crate::model::now_ms(),
            unused_since_ms: None,
        })
        .await
}

/// A function's image as `image ls` shows it.
#[derive(Debug, Clone)]
pub struct ImageUse {
    /// The image ID; `None` when the Engine does not have the image now.
    pub id: Option<String>,
    /// The pinned reference (or, unpinned, the tag) the functions run.
    pub reference: String,
    pub size_bytes: Option<u64>,
    /// hyperfuncd pulled it: it goes once no function uses it.
    pub pulled: bool,
    pub functions: Vec<FnKey>,
}

impl Scheduler {
    /// `owner`'s login to `host`, else the host file's: the one a pull
    /// of theirs uses. `Err` says why none can be had, in words for the
    /// call's record.
    async fn login_for(&self, owner: &Name, host: &str) -> Result<Option<RegistryLogin>, String> {
        let own = self
            .store
            .registry_logins(owner)
            .await
            .map_err(|e| format!("the owner's registry logins cannot be read: {e}"))?;
        if let Some(l) = own.into_iter().find(|l| l.host == host) {
            return Ok(Some(l));
        }
        match &self.config.images.credentials_file {
            None => Ok(None),
            Some(file) => crate::registry::host_login(file, host).await.map_err(|e| {
                tracing::warn!(error = %e, "[images] credentials_file unreadable");
                "the server's registry credentials file cannot be read".to_string()
            }),
        }
    }

    /// Before a cold call of `f`: makes sure the Engine has the image it
    /// pins, pulling that digest again (with the owner's login) if someone
    /// removed it. An image ID cannot be pulled: the error says so, and
    /// the call fails with it rather than run anything else.
    pub(super) async fn ensure_pinned(&self, f: &Function) -> Result<(), RuntimeError> {
        let Some(pinned) = f.image_digest.as_deref() else {
            return Ok(());
        };
        if self.runtime.resolve(pinned).await?.is_some() {
            return Ok(());
        }
        if !pinned.contains('@') {
            return Err(RuntimeError::BadImage(format!(
                "the function's image {pinned} (a local image, from no registry) is gone from the Docker Engine; update the function to an image that is there"
            )));
        }
        let host = crate::model::ImageRef::parse(pinned)
            .ok()
            .and_then(|r| r.registry().map(str::to_string));
        let login = match &host {
            Some(h) => self
                .login_for(&f.owner, h)
                .await
                .map_err(RuntimeError::Engine)?,
            None => None,
        };
        let auth = PullAuth {
            login: login.as_ref(),
            always: false,
        };
        let timeout = Duration::from_secs(self.config.docker.pull_timeout_secs);
        let r = self
            .runtime
            .ensure_image(pinned, timeout, None, &auth)
            .await?;
        crate::logging::image_pulled_again(&f.key(), pinned);
        if r.fresh {
            if let Err(e) = note_pulled(&*self.store, self.runtime.instance(), pinned, &r).await {
                tracing::warn!(error = %e, image = pinned, "could not record the pulled image");
            }
        }
        Ok(())
    }

    /// The image sweep, until `shutdown`: every quarter of `gc_after`
    /// (between 1 s and 1 min). The first pass also pins the functions
    /// stored before digests were.
    pub(super) async fn images_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let every = (self.config.images.gc_after / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pinned = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !pinned {
                pinned = self.pin_unpinned().await.is_ok();
            }
            if let Err(e) = self.sweep_images().await {
                tracing::debug!(error = %e, "image sweep skipped");
            }
        }
    }

    /// Pins each function stored before digests were to what its tag
    /// names on the Engine now (no pull: the image it has run so far). One
    /// whose image is not there stays unpinned (its calls run the tag,
    /// as before) until its next update.
    async fn pin_unpinned(&self) -> Result<(), String> {
        let functions = self
            .store
            .list_functions(None)
            .await
            .map_err(|e| e.to_string())?;
        for f in functions.into_iter().filter(|f| f.image_digest.is_none()) {
            let Some(r) = self
                .runtime
                .resolve(&f.spec.image)
                .await
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            let mut pinned = f.clone();
            pinned.image_digest = Some(r.pinned);
            // Lost to an update meanwhile: that one pinned it.
            if self.store.update_function(&f, &pinned).await.is_ok() {
                tracing::info!(function = %f.name, owner = %f.owner,
                    image_digest = pinned.image_digest.as_deref().unwrap_or(""),
                    "function pinned to its image's digest");
                self.function_changed(&pinned);
            }
        }
        Ok(())
    }

    /// The images functions use on this Engine, by image ID (or by
    /// reference, for an image the Engine does not have now).
    pub async fn image_uses(&self) -> Result<Vec<ImageUse>, String> {
        let functions = self
            .store
            .list_functions(None)
            .await
            .map_err(|e| e.to_string())?;
        let pulled = self
            .store
            .pulled_images(self.runtime.instance())
            .await
            .map_err(|e| e.to_string())?;
        let mut uses: Vec<ImageUse> = Vec::new();
        for f in functions {
            let reference = f.run_image().to_string();
            let id = self
                .runtime
                .resolve(&reference)
                .await
                .map_err(|e| e.to_string())?
                .map(|r| r.id);
            let found = uses.iter_mut().find(|u| match (&u.id, &id) {
                (Some(a), Some(b)) => a == b,
                (None, None) => u.reference == reference,
                _ => false,
            });
            match found {
                Some(u) => u.functions.push(f.key()),
                None => uses.push(ImageUse {
                    pulled: id
                        .as_ref()
                        .is_some_and(|i| pulled.iter().any(|p| &p.id == i)),
                    id,
                    reference,
                    size_bytes: None,
                    functions: vec![f.key()],
                }),
            }
        }
        for u in &mut uses {
            if let Some(id) = &u.id {
                u.size_bytes = self
                    .runtime
                    .image_size(id)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|(size, _)| size);
            }
        }
        uses.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(uses)
    }

    /// One pass over the images hyperfuncd pulled: one a function uses is
    /// kept (and its unused mark cleared); one no function uses is marked
    /// unused (stored), and removed once it has been for `gc_after`.
    async fn sweep_images(&self) -> Result<(), String> {
        let instance = self.runtime.instance();
        let records = self
            .store
            .pulled_images(instance)
            .await
            .map_err(|e| e.to_string())?;
        if records.is_empty() {
            return Ok(());
        }
        let functions = self
            .store
            .list_functions(None)
            .await
            .map_err(|e| e.to_string())?;
        // Image ID -> how many functions run it. A function whose image is
        // gone uses no local image; an Engine error skips the whole pass.
        let mut used: HashMap<String, usize> = HashMap::new();
        for f in &functions {
            if let Some(r) = self
                .runtime
                .resolve(f.run_image())
                .await
                .map_err(|e| e.to_string())?
            {
                *used.entry(r.id).or_default() += 1;
            }
        }
        let now = crate::model::now_ms();
        let grace = u64::try_from(self.config.images.gc_after.as_millis()).unwrap_or(u64::MAX);
        for mut rec in records {
            if used.contains_key(&rec.id) {
                if rec.unused_since_ms.is_some() {
                    rec.unused_since_ms = None;
                    self.store
                        .put_pulled_image(&rec)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                continue;
            }
            let Some(since) = rec.unused_since_ms else {
                tracing::debug!(image = %rec.id, "pulled image unused; removed after gc_after");
                rec.unused_since_ms = Some(now);
                self.store
                    .put_pulled_image(&rec)
                    .await
                    .map_err(|e| e.to_string())?;
                continue;
            };
            let unused = now.saturating_sub(since);
            if unused < grace {
                continue;
            }
            match self
                .runtime
                .remove_image(&rec.id, &rec.repository)
                .await
                .map_err(|e| e.to_string())?
            {
                ImageRemoval::InUse => {
                    tracing::debug!(image = %rec.id, "unused by functions but a container uses it; kept for now");
                    continue;
                }
                ImageRemoval::Gone => {}
                r @ (ImageRemoval::Removed | ImageRemoval::Kept) => {
                    crate::logging::image_removed(
                        &rec.id,
                        &rec.repository,
                        unused / 1000,
                        r == ImageRemoval::Kept,
                    );
                }
            }
            self.store
                .delete_pulled_image(instance, &rec.id)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
