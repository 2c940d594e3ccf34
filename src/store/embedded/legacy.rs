//! Records of earlier layouts, read once by `migrate` and written back in
//! today's. bincode's layout is positional: a field added to a stored struct
//! shifts every byte after it, so an old record cannot be read with the new
//! shape and is converted here instead.

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

    #[tokio::test]
    async fn functions_of_schema_1_and_2_are_read_and_rewritten() {
        for schema in [Some(2), None] {
            let dir = tempfile::tempdir().unwrap();
            let made = old_database(dir.path(), schema);
            let store = open(dir.path());
            for (name, secret) in &made {
                let f = store.get_function(name).await.unwrap().unwrap();
                assert_eq!(&f.secret, secret, "{schema:?}");
                assert_eq!(f.spec.runtime, None);
                assert_eq!(f.spec.command, vec!["cat".to_string()]);
                assert_eq!(f.spec.timeout_ms, Some(5000));
                assert_eq!((f.created_ms, f.updated_ms), (1, 2));
            }
            // A new field is stored and read back; the layout is now 3.
            let mut f = store.get_function(&made[0].0).await.unwrap().unwrap();
            f.spec.runtime = Some("runsc".into());
            store.update_function(&f).await.unwrap();
            drop(store);
            let store = open(dir.path());
            let again = store.get_function(&made[0].0).await.unwrap().unwrap();
            assert_eq!(again, f);
            assert_eq!(store.list_functions(None).await.unwrap().len(), 2);
            let schema: u64 =
                decode(&store.inner.tree(META).get("schema").unwrap().unwrap()).unwrap();
            assert_eq!(schema, SCHEMA);
        }
    }
}
