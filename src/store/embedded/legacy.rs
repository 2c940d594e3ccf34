//! Records of earlier layouts, read once by `migrate` and written back in
//! today's. bincode's layout is positional: a field added to a stored struct
//! shifts every byte after it, so an old record cannot be read with the new
//! shape and is converted here instead.

use super::codec::{key_prefix, seq_prefix};
use super::*;
use crate::model::{EnvVar, FunctionSpec, Secret};

/// A function record of schemas 1 and 2: its spec had no `runtime`.
#[derive(Serialize, serde::Deserialize)]
pub(super) struct FunctionV2 {
    pub name: Name,
    pub owner: Name,
    pub spec: SpecV2,
    pub secret: Secret,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Serialize, serde::Deserialize)]
pub(super) struct SpecV2 {
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<EnvVar>,
    pub timeout_ms: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
}

impl From<FunctionV2> for Function {
    fn from(f: FunctionV2) -> Function {
        let s = f.spec;
        Function {
            name: f.name,
            owner: f.owner,
            spec: FunctionSpec {
                image: s.image,
                command: s.command,
                env: s.env,
                timeout_ms: s.timeout_ms,
                memory_bytes: s.memory_bytes,
                cpus: s.cpus,
                // It had none: it follows the daemon's default, as before.
                runtime: None,
            },
            secret: f.secret,
            created_ms: f.created_ms,
            updated_ms: f.updated_ms,
            image_digest: None,
            webhook: None,
            schedule: None,
        }
    }
}

impl Inner {
    /// Schema 3 appended `runtime` to a function's spec. Every function
    /// record and the schema number change in one transaction, so a crash
    /// leaves the old layout or the new one, never a mix that the next open
    /// would misread.
    pub(super) fn migrate_functions_to_3(&self) -> Result<()> {
        let mut records = Vec::new();
        for kv in self.tree(FUNCTIONS).iter() {
            let (k, v) = kv?;
            let f: Function = decode::<FunctionV2>(&v)?.into();
            records.push((k, encode(&f)?));
        }
        let schema = encode(&3u64)?;
        tracing::info!(
            functions = records.len(),
            "migrating the database to schema 3"
        );
        self.tx(|t| {
            for (k, v) in &records {
                t[FUNCTIONS].insert(k.as_ref(), v.as_slice())?;
            }
            t[META].insert("schema", schema.as_slice())?;
            Ok(())
        })
    }
}

impl Inner {
    /// Schema 5 appended `limits` to a user's record and counts each
    /// owner's queue in `queued`. Users are rewritten (in today's shape),
    /// and `queued` is rebuilt from the queue, in one batch with the schema
    /// number, so a crash leaves either layout whole.
    pub(super) fn migrate_to_5(&self) -> Result<()> {
        let (batch, users) = self.upgraded_users()?;
        let mut queued: HashMap<Vec<u8>, QueueUse> = HashMap::new();
        for kv in self.tree(QUEUE).iter() {
            let (k, id) = kv?;
            if let Some(call) = get::<Call>(self.tree(CALLS), &id)? {
                let used = queued.entry(key_prefix(&k).to_vec()).or_default();
                used.calls += 1;
                used.bytes += call.stdin_len;
            }
        }
        tracing::info!(
            users,
            owners = queued.len(),
            "migrating the database to schema 5 (user budgets)"
        );
        let mut counts = sled::Batch::default();
        for kv in self.tree(QUEUED).iter() {
            counts.remove(kv?.0);
        }
        for (owner, used) in &queued {
            counts.insert(owner.as_slice(), encode(used)?);
        }
        let schema = encode(&5u64)?;
        self.write_lock().transaction(|t| {
            t[USERS].apply_batch(&batch)?;
            t[QUEUED].apply_batch(&counts)?;
            t[META].insert("schema", schema.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        Ok(())
    }

    /// Schema 6 appended `reserved` to a user's `limits`: every user of an
    /// older shape is rewritten in today's, in one transaction with the
    /// schema number.
    pub(super) fn migrate_users_to_6(&self) -> Result<()> {
        let (batch, users) = self.upgraded_users()?;
        tracing::info!(
            users,
            "migrating the database to schema 6 (reserved host slots)"
        );
        let schema = encode(&6u64)?;
        self.write_lock().transaction(|t| {
            t[USERS].apply_batch(&batch)?;
            t[META].insert("schema", schema.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        Ok(())
    }

    /// The users whose records are of an older shape, in today's, and how
    /// many. A record that already reads as today's is kept. The shapes
    /// cannot be confused: each one appended fields to the one before, so
    /// an older record is too short for a newer shape, and the codec
    /// refuses trailing bytes, so a newer one is too long for an older.
    fn upgraded_users(&self) -> Result<(sled::Batch, usize)> {
        let mut batch = sled::Batch::default();
        let mut users = 0;
        for kv in self.tree(USERS).iter() {
            let (k, v) = kv?;
            if decode::<User>(&v).is_ok() {
                continue;
            }
            let u: User = match decode::<crate::model::UserV2>(&v) {
                Ok(old) => old.into(),
                Err(_) => decode::<crate::model::UserV1>(&v)?.into(),
            };
            batch.insert(k, encode(&u)?);
            users += 1;
        }
        Ok((batch, users))
    }
}

/// Entries re-keyed per atomic batch by `migrate_keys_to_4`.
const REKEY_BATCH: usize = 1000;

impl Inner {
    /// Schema 4 keys everything kept per function by `owner NUL name`
    /// instead of the bare name (names were global before). Crash-safe and
    /// re-runnable: the trees are done one after the other, each in atomic
    /// batches that insert an entry's new key and remove its old one; an
    /// old key is told from a new one by its NUL (no name holds one), so a
    /// re-run after a crash skips what is done. `schema` changes last.
    pub(super) fn migrate_keys_to_4(&self) -> Result<()> {
        tracing::info!("migrating the database to schema 4 (functions keyed by owner)");
        // Owners by name: function records are read whatever their key.
        let mut owners: HashMap<String, Name> = HashMap::new();
        for kv in self.tree(FUNCTIONS).iter() {
            let f: Function = decode(&kv?.1)?;
            owners.insert(f.name.to_string(), f.owner);
        }
        // The owner of a call id (an index entry's value, an event's call).
        let call_owner = |id: &[u8]| -> Result<Option<Name>> {
            Ok(get::<Call>(self.tree(CALLS), id)?.map(|c| c.owner))
        };
        // A removed function's owner, when its record is gone: its calls
        // still say whose. A purge a crash interrupted removes each call
        // record before its `fn_calls` entry, so any entry (the first one
        // most likely) may name a call that is gone: walk them all, then
        // the other indexes naming its calls. (These trees are re-keyed
        // after `stats`, so their keys are still the old ones.)
        let removed_owner = |name: &str| -> Result<Option<Name>> {
            let prefix = seq_prefix(name);
            for tree in [FN_CALLS, LIVE, OUTPUT_INDEX] {
                for kv in self.tree(tree).scan_prefix(&prefix) {
                    if let Some(o) = call_owner(&kv?.1)? {
                        return Ok(Some(o));
                    }
                }
            }
            for kv in self.tree(LOGS).scan_prefix(&prefix) {
                let ev: Event = decode(&kv?.1)?;
                if let Some(o) = call_owner(ev.call_id.as_bytes())? {
                    return Ok(Some(o));
                }
            }
            Ok(None)
        };
        // functions and stats: `name` -> `owner NUL name`.
        self.rekey(FUNCTIONS, |k, v| {
            if k.contains(&0) {
                return Ok(None);
            }
            let f: Function = decode(v)?;
            Ok(Some(Some(f.key().store_key().into_bytes())))
        })?;
        self.rekey(STATS, |k, _| {
            if k.contains(&0) {
                return Ok(None);
            }
            let name = String::from_utf8_lossy(k).to_string();
            let owner = match owners.get(&name) {
                Some(o) => Some(o.clone()),
                None => removed_owner(&name)?,
            };
            Ok(Some(owner.map(|o| with_owner(&o, k))))
        })?;
        // What re-keyed stats name, for the caches of removed functions.
        for kv in self.tree(STATS).iter() {
            if let Some(key) = super::directory::parse_store_key(&kv?.0) {
                owners.entry(key.name.to_string()).or_insert(key.owner);
            }
        }
        let is_old = |k: &[u8]| !key_prefix(k).contains(&0);
        for tree in [FN_CALLS, LIVE, OUTPUT_INDEX] {
            self.rekey(tree, |k, v| {
                if !is_old(k) {
                    return Ok(None);
                }
                let name = String::from_utf8_lossy(key_prefix(k)).to_string();
                let owner = match call_owner(v)? {
                    Some(o) => Some(o),
                    None => owners.get(&name).cloned(),
                };
                Ok(Some(owner.map(|o| with_owner(&o, k))))
            })?;
        }
        self.rekey(LOGS, |k, v| {
            if !is_old(k) {
                return Ok(None);
            }
            let name = String::from_utf8_lossy(key_prefix(k)).to_string();
            let ev: Event = decode(v)?;
            let owner = match call_owner(ev.call_id.as_bytes())? {
                Some(o) => Some(o),
                None => owners.get(&name).cloned(),
            };
            Ok(Some(owner.map(|o| with_owner(&o, k))))
        })?;
        self.write_lock()
            .tree(META)
            .insert("schema", encode(&4u64)?)?;
        Ok(())
    }

    /// Moves the entries of `tree` that `new_key` re-keys: `None` leaves an
    /// entry, `Some(None)` drops it (nothing says whose it is: a removed
    /// function's leftovers), `Some(Some(k))` moves it to `k`. Each batch
    /// is atomic, so a crash loses no entry and leaves none twice.
    fn rekey(
        &self,
        tree: usize,
        new_key: impl Fn(&[u8], &[u8]) -> Result<Option<Option<Vec<u8>>>>,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        let mut dropped = 0u64;
        for kv in self.tree(tree).iter() {
            let (k, v) = kv?;
            match new_key(&k, &v)? {
                None => continue,
                Some(Some(nk)) => batch.insert(nk, v),
                Some(None) => dropped += 1,
            }
            batch.remove(k);
            pending += 1;
            if pending == REKEY_BATCH {
                self.write_lock()
                    .tree(tree)
                    .apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        if pending > 0 {
            self.write_lock().tree(tree).apply_batch(batch)?;
        }
        if dropped > 0 {
            tracing::warn!(
                tree = TREE_NAMES[tree],
                entries = dropped,
                "dropped entries of a removed function whose owner is unknown"
            );
        }
        Ok(())
    }
}

/// `key` (a bare name, or `name NUL seq`) under `owner`.
fn with_owner(owner: &Name, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.as_str().len() + 1 + key.len());
    k.extend_from_slice(owner.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old_function(name: &str) -> FunctionV2 {
        FunctionV2 {
            name: Name::parse(name).unwrap(),
            owner: Name::parse("alice").unwrap(),
            spec: SpecV2 {
                image: "busybox".into(),
                command: vec!["cat".into()],
                env: vec![EnvVar::parse("A=1").unwrap()],
                timeout_ms: Some(5000),
                memory_bytes: Some(64 << 20),
                cpus: Some(0.5),
            },
            secret: Secret::new(),
            created_ms: 1,
            updated_ms: 2,
        }
    }

    /// Writes a database as an older release left it: functions in the old
    /// layout, and `schema` if given (schema 1 had none).
    fn old_database(dir: &Path, schema: Option<u64>) -> Vec<(Name, Secret)> {
        let db = sled::open(dir).unwrap();
        let functions = db.open_tree("functions").unwrap();
        let mut made = Vec::new();
        for n in ["f", "g"] {
            let f = old_function(n);
            made.push((f.name.clone(), f.secret.clone()));
            functions.insert(n, encode(&f).unwrap()).unwrap();
        }
        if let Some(s) = schema {
            db.open_tree("meta")
                .unwrap()
                .insert("schema", encode(&s).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
        made
    }

    fn open(dir: &Path) -> SledStore {
        let config = StoreConfig {
            inline_max_bytes: 4,
            min_free_bytes: 0,
            ballast_bytes: 0,
            output_budget: u64::MAX,
            log_budget: u64::MAX,
        };
        // sled's background thread may hold the lock a moment after drop.
        for _ in 0..50 {
            if let Ok(s) = SledStore::open(dir, config.clone()) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        SledStore::open(dir, config).unwrap()
    }

    fn function_of(owner: &str, name: &str) -> Function {
        Function {
            image_digest: None,
            webhook: None,
            schedule: None,
            name: Name::parse(name).unwrap(),
            owner: Name::parse(owner).unwrap(),
            spec: FunctionSpec {
                image: "busybox".into(),
                command: vec![],
                env: vec![],
                timeout_ms: None,
                memory_bytes: None,
                cpus: None,
                runtime: None,
            },
            secret: Secret::new(),
            created_ms: 1,
            updated_ms: 1,
        }
    }

    async fn accept_call(store: &SledStore, f: &Function, payload: &[u8]) -> Call {
        let call = Call::new(f.name.clone(), f.owner.clone(), 0, payload, vec![]);
        store
            .accept(call, Bytes::copy_from_slice(payload))
            .await
            .unwrap()
    }

    async fn run_call(store: &SledStore, call: &Call, stdout: &[u8]) {
        assert!(matches!(
            store.start(&call.id).await.unwrap(),
            Started::Running(..)
        ));
        let outcome = Outcome {
            image_digest: None,
            state: CallState::Finished,
            exit_code: Some(0),
            message: None,
            stdout: Bytes::copy_from_slice(stdout),
            stderr: Bytes::new(),
        };
        store.finish(&call.id, outcome).await.unwrap();
    }

    /// The trees schema 4 re-keyed, in the order `migrate_keys_to_4` goes.
    const REKEYED: [usize; 6] = [FUNCTIONS, STATS, FN_CALLS, LIVE, OUTPUT_INDEX, LOGS];

    /// Rewrites a database of today's layout as schema 3 wrote it (the
    /// owner taken off every key) — or, with `crash_in`, as a migration
    /// interrupted in that tree left it: the trees before it done, half of
    /// it done, the rest still old.
    fn as_schema_3(dir: &Path, crash_in: Option<usize>) {
        // The store just dropped may still hold sled's file lock for a
        // moment (its threads let go of the database after the drop).
        let mut tries = 0;
        let db = loop {
            match sled::open(dir) {
                Ok(db) => break db,
                Err(e) if tries < 100 => {
                    tries += 1;
                    eprintln!("reopening for the rewrite: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("cannot reopen {}: {e}", dir.display()),
            }
        };
        let stop = crash_in.map_or(0, |t| REKEYED.iter().position(|r| *r == t).unwrap());
        for (i, t) in REKEYED.iter().enumerate() {
            let tree = db.open_tree(TREE_NAMES[*t]).unwrap();
            let entries: Vec<_> = tree.iter().map(|kv| kv.unwrap()).collect();
            let keep_new = match crash_in {
                Some(_) if i < stop => entries.len(),
                Some(_) if i == stop => entries.len() / 2,
                _ => 0,
            };
            for (k, v) in entries.into_iter().skip(keep_new) {
                let nul = k.iter().position(|b| *b == 0).unwrap();
                tree.remove(&k).unwrap();
                tree.insert(&k[nul + 1..], v).unwrap();
            }
        }
        db.open_tree("meta")
            .unwrap()
            .insert("schema", encode(&3u64).unwrap())
            .unwrap();
        db.flush().unwrap();
    }

    #[tokio::test]
    async fn schema_3_data_is_keyed_by_owner_even_after_a_crash_midway() {
        for crash_in in [None, Some(FUNCTIONS), Some(STATS), Some(LIVE), Some(LOGS)] {
            let dir = tempfile::tempdir().unwrap();
            let f = function_of("alice", "resize");
            let g = function_of("bob", "thumb");
            let h = function_of("alice", "gone");
            let (done, queued, before) = {
                let store = open(dir.path());
                for x in [&f, &g, &h] {
                    store.create_function(x).await.unwrap();
                }
                let done = accept_call(&store, &f, b"ab").await;
                run_call(&store, &done, b"out-a").await;
                // A payload of its own file (inline_max_bytes is 4).
                let queued = accept_call(&store, &f, b"a file payload").await;
                let other = accept_call(&store, &g, b"g").await;
                run_call(&store, &other, b"out-g").await;
                // Removed but not purged: its counters and calls remain.
                // Its purge was cut short by a crash right after removing
                // the first call's record, so its first `fn_calls` entry
                // names a call that is gone; the second still says whose.
                let purged = accept_call(&store, &h, b"h").await;
                accept_call(&store, &h, b"h2").await;
                store.remove_function(&h.key()).await.unwrap();
                let w = store.inner.write_lock();
                assert!(w
                    .tree(CALLS)
                    .remove(purged.id.as_bytes())
                    .unwrap()
                    .is_some());
                drop(w);
                let mut before = Vec::new();
                for k in [f.key(), g.key(), h.key()] {
                    let events = store.events(&k, None, None, None).await.unwrap().len();
                    before.push((store.stats(&k).await.unwrap(), events));
                }
                (done, queued, before)
            };
            as_schema_3(dir.path(), crash_in);
            let store = open(dir.path());
            let why = format!("crash in {crash_in:?}");
            for (x, (stats, events)) in [&f, &g, &h].into_iter().zip(&before) {
                let k = x.key();
                assert_eq!(store.stats(&k).await.unwrap(), *stats, "{why}: {k}");
                let now = store.events(&k, None, None, None).await.unwrap().len();
                assert_eq!(now, *events, "{why}: {k}");
            }
            let got = store.get_function(&f.key()).await.unwrap().unwrap();
            assert_eq!(got, f, "{why}");
            let by_secret = store.function_by_secret(g.secret.as_str()).await.unwrap();
            assert_eq!(by_secret.as_ref(), Some(&g), "{why}");
            assert_eq!(store.list_functions(None).await.unwrap().len(), 2, "{why}");
            assert_eq!(
                store.unpurged_functions().await.unwrap(),
                vec![h.key()],
                "{why}"
            );
            let live = store.live_calls(&f.key()).await.unwrap();
            assert_eq!(
                live.iter().map(|c| c.id).collect::<Vec<_>>(),
                vec![queued.id]
            );
            match store.take_output(&done.id).await.unwrap() {
                Some(OutputLookup::Output(_, out)) => assert_eq!(&out[..], b"out-a", "{why}"),
                other => panic!("{why}: {other:?}"),
            }
            match store.start(&queued.id).await.unwrap() {
                Started::Running(_, p) => assert_eq!(&p[..], b"a file payload", "{why}"),
                Started::Skipped => panic!("{why}: the queued call did not start"),
            }
            store.purge_function(&h.key()).await.unwrap();
            assert!(store.unpurged_functions().await.unwrap().is_empty());
            // Another owner's function of an existing name is its own.
            let twin = function_of("bob", "resize");
            store.create_function(&twin).await.unwrap();
            assert_eq!(store.stats(&twin.key()).await.unwrap().total, 0);
            let schema: u64 =
                decode(&store.inner.tree(META).get("schema").unwrap().unwrap()).unwrap();
            assert_eq!(schema, SCHEMA, "{why}");
        }
    }

    #[tokio::test]
    async fn functions_of_schema_1_and_2_are_read_and_rewritten() {
        for schema in [Some(2), None] {
            let dir = tempfile::tempdir().unwrap();
            let made = old_database(dir.path(), schema);
            let store = open(dir.path());
            for (name, secret) in &made {
                let key = FnKey::new(Name::parse("alice").unwrap(), name.clone());
                let f = store.get_function(&key).await.unwrap().unwrap();
                assert_eq!(&f.secret, secret, "{schema:?}");
                assert_eq!(f.spec.runtime, None);
                assert_eq!(f.spec.command, vec!["cat".to_string()]);
                assert_eq!(f.spec.timeout_ms, Some(5000));
                assert_eq!((f.created_ms, f.updated_ms), (1, 2));
            }
            // A new field is stored and read back; the layout is now 3.
            let key = FnKey::new(Name::parse("alice").unwrap(), made[0].0.clone());
            let read = store.get_function(&key).await.unwrap().unwrap();
            let mut f = read.clone();
            f.spec.runtime = Some("runsc".into());
            store.update_function(&read, &f).await.unwrap();
            drop(store);
            let store = open(dir.path());
            let again = store.get_function(&key).await.unwrap().unwrap();
            assert_eq!(again, f);
            assert_eq!(store.list_functions(None).await.unwrap().len(), 2);
            let schema: u64 =
                decode(&store.inner.tree(META).get("schema").unwrap().unwrap()).unwrap();
            assert_eq!(schema, SCHEMA);
        }
    }
}
