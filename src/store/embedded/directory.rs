//! Users (with the key index) and functions (with their counters).

use super::codec::seq_prefix;
use super::*;

impl Inner {
    pub(super) fn create_user(&self, user: &User, fx: &mut Effects) -> Result<()> {
        self.tx(|t| {
            if t[USERS].get(user.name.as_str())?.is_some() {
                return abort(StoreError::Conflict(format!(
                    "user {} already exists",
                    user.name
                )));
            }
            t[USERS].insert(user.name.as_str(), enc(user)?)?;
            t[KEYS].insert(&user.key_hash[..], user.name.as_str())?;
            Ok(())
        })?;
        fx.committed = true;
        Ok(())
    }

    pub(super) fn update_user(&self, user: &User, fx: &mut Effects) -> Result<()> {
        self.tx(|t| {
            let old: User = match t[USERS].get(user.name.as_str())? {
                Some(v) => dec(&v)?,
                None => return abort(StoreError::NotFound(format!("user {}", user.name))),
            };
            t[KEYS].remove(&old.key_hash[..])?;
            t[KEYS].insert(&user.key_hash[..], user.name.as_str())?;
            t[USERS].insert(user.name.as_str(), enc(user)?)?;
            Ok(())
        })?;
        fx.committed = true;
        Ok(())
    }

    pub(super) fn delete_user(&self, name: &Name, fx: &mut Effects) -> Result<()> {
        let owns = self.list_functions(Some(name))?;
        if let Some(f) = owns.first() {
            return Err(StoreError::Conflict(format!(
                "user {name} still owns {} function(s), e.g. {}: remove them first",
                owns.len(),
                f.name
            )));
        }
        self.tx(|t| {
            let user: User = match t[USERS].remove(name.as_str())? {
                Some(v) => dec(&v)?,
                None => return abort(StoreError::NotFound(format!("user {name}"))),
            };
            t[KEYS].remove(&user.key_hash[..])?;
            Ok(())
        })?;
        // A new user of the same name must not inherit these logins.
        let w = self.write_lock();
        let logins = w.tree(REGISTRY_LOGINS);
        for kv in logins.scan_prefix(login_prefix(name)) {
            logins.remove(kv?.0)?;
        }
        fx.committed = true;
        Ok(())
    }

    pub(super) fn put_registry_login(
        &self,
        owner: &Name,
        login: &RegistryLogin,
        fx: &mut Effects,
    ) -> Result<()> {
        self.write_lock()
            .tree(REGISTRY_LOGINS)
            .insert(login_key(owner, &login.host), encode(login)?)?;
        fx.committed = true;
        Ok(())
    }

    pub(super) fn registry_logins(&self, owner: &Name) -> Result<Vec<RegistryLogin>> {
        values(self.tree(REGISTRY_LOGINS).scan_prefix(login_prefix(owner)))
    }

    pub(super) fn delete_registry_login(
        &self,
        owner: &Name,
        host: &str,
        fx: &mut Effects,
    ) -> Result<bool> {
        let removed = self
            .write_lock()
            .tree(REGISTRY_LOGINS)
            .remove(login_key(owner, host))?;
        fx.committed = removed.is_some();
        Ok(removed.is_some())
    }

    pub(super) fn create_function(&self, f: &Function, fx: &mut Effects) -> Result<()> {
        self.tx(|t| {
            let key = f.key().store_key();
            if t[FUNCTIONS].get(key.as_str())?.is_some() {
                return abort(StoreError::Conflict(format!(
                    "function {} already exists",
                    f.name
                )));
            }
            // Counters without a record: an earlier function of this name is
            // still being purged, and its calls share the name's keys.
            if t[STATS].get(key.as_str())?.is_some() {
                return abort(StoreError::Conflict(format!(
                    "function {} is still being removed; try again in a moment",
                    f.name
                )));
            }
            t[FUNCTIONS].insert(key.as_str(), enc(f)?)?;
            t[STATS].insert(key.as_str(), enc(&FunctionStats::default())?)?;
            Ok(())
        })?;
        fx.committed = true;
        Ok(())
    }

    pub(super) fn update_function(
        &self,
        read: &Function,
        f: &Function,
        fx: &mut Effects,
    ) -> Result<()> {
        self.tx(|t| {
            let key = f.key().store_key();
            let stored: Function = match t[FUNCTIONS].get(key.as_str())? {
                Some(v) => dec(&v)?,
                None => return abort(StoreError::NotFound(format!("function {}", f.name))),
            };
            if &stored != read {
                return abort(changed_meanwhile(&f.name));
            }
            t[FUNCTIONS].insert(key.as_str(), enc(f)?)?;
            Ok(())
        })?;
        fx.committed = true;
        Ok(())
    }

    pub(super) fn list_functions(&self, owner: Option<&Name>) -> Result<Vec<Function>> {
        let all: Vec<Function> = values(self.tree(FUNCTIONS).iter())?;
        Ok(all
            .into_iter()
            .filter(|f| owner.is_none_or(|o| &f.owner == o))
            .collect())
    }

    pub(super) fn remove_function(&self, key: &FnKey, fx: &mut Effects) -> Result<()> {
        let removed = self
            .write_lock()
            .tree(FUNCTIONS)
            .remove(key.store_key().as_str())?;
        if removed.is_none() {
            return Err(StoreError::NotFound(format!("function {}", key.name)));
        }
        fx.committed = true;
        Ok(())
    }

    /// Deletes a removed function's calls, outputs, events and counters,
    /// all under one hold of the write lock, after checking under it that
    /// the function still has no record: nothing (an accept, a start, a
    /// re-create of the name) runs between the check and the last delete,
    /// so a purge never touches a re-created function's calls, and two
    /// purges of one name run one after the other. A RUNNING call still has
    /// a container and is waited for. A crash midway leaves the counters
    /// (removed last), so the prune finishes the purge, and the name cannot
    /// be taken again until it has.
    pub(super) fn purge_function(&self, key: &FnKey, fx: &mut Effects) -> Result<()> {
        let name = key;
        let w = self.write_lock();
        if w.tree(FUNCTIONS).get(key.store_key().as_str())?.is_some() {
            return Err(StoreError::Conflict(format!(
                "function {name} exists: remove it first"
            )));
        }
        let prefix = seq_prefix(&key.store_key());
        for kv in w.tree(LIVE).scan_prefix(&prefix) {
            let (_, id) = kv?;
            if let Some(call) = get::<Call>(self.tree(CALLS), &id)? {
                if call.state == CallState::Running {
                    return Err(StoreError::Conflict(format!(
                        "call {} of function {name} is still running",
                        call.id
                    )));
                }
            }
        }
        fx.committed = true;
        let mut dequeued = false;
        for kv in w.tree(FN_CALLS).scan_prefix(&prefix) {
            let (k, id) = kv?;
            if let Some(call) = get::<Call>(self.tree(CALLS), &id)? {
                dequeued |= w
                    .tree(QUEUE)
                    .remove(seq_key(call.owner.as_str(), call.seq))?
                    .is_some();
                if let Some(done) = call.finished_ms {
                    w.tree(DONE).remove(done_key(done, &call.id))?;
                }
            }
            w.tree(CALLS).remove(&id)?;
            w.tree(IDEM_CALLS).remove(&id)?;
            let cid = call_id(&id)?;
            if let Some(v) = w.tree(WEBHOOKS).remove(&id)? {
                if let Some(due) = decode::<crate::model::Delivery>(&v)?.due_ms() {
                    w.tree(WEBHOOK_DUE).remove(done_key(due, &cid))?;
                }
            }
            for (tree, kind) in [(PAYLOADS, Kind::Payload), (OUTPUTS, Kind::Output)] {
                if let Some(v) = w.tree(tree).remove(&id)? {
                    if let Marker::File(_) = Marker::decode(&v)? {
                        fx.deletes.push(self.blobs.path(kind, &cid));
                    }
                }
            }
            w.tree(FN_CALLS).remove(k)?;
        }
        for tree in [OUTPUT_INDEX, LOGS, LIVE, IDEM] {
            for kv in w.tree(tree).scan_prefix(&prefix) {
                w.tree(tree).remove(kv?.0)?;
            }
        }
        if dequeued {
            // Calls still queued (a cancel that failed): their owner's count.
            self.recount_queue(&w, &key.owner)?;
        }
        // Last: counters without a record mark a purge not yet done.
        w.tree(STATS).remove(key.store_key().as_str())?;
        Ok(())
    }

    pub(super) fn unpurged_functions(&self) -> Result<Vec<FnKey>> {
        let mut out = Vec::new();
        for kv in self.tree(STATS).iter() {
            let (k, _) = kv?;
            if self.tree(FUNCTIONS).get(&k)?.is_none() {
                if let Some(key) = parse_store_key(&k) {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }

    pub(super) fn stats(&self, function: &FnKey) -> Result<FunctionStats> {
        Ok(get(self.tree(STATS), function.store_key().as_str())?.unwrap_or_default())
    }
}

/// The function key of a `functions` or `stats` key (`owner NUL name`).
pub(super) fn parse_store_key(k: &[u8]) -> Option<FnKey> {
    let s = std::str::from_utf8(k).ok()?;
    let (owner, name) = s.split_once('\0')?;
    Some(FnKey::new(
        Name::parse(owner).ok()?,
        Name::parse(name).ok()?,
    ))
}

/// Key of the retention index: ends oldest first, then by id.
pub(super) fn done_key(finished_ms: u64, id: &CallId) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&finished_ms.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// `owner\0`: names hold no NUL, so one owner's logins share exactly this prefix.
fn login_prefix(owner: &Name) -> Vec<u8> {
    let mut k = owner.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

fn login_key(owner: &Name, host: &str) -> Vec<u8> {
    let mut k = login_prefix(owner);
    k.extend_from_slice(host.as_bytes());
    k
}
