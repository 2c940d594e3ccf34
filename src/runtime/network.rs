//! The Engine network calls join (`[container] network`): made once per
//! daemon, its inter-container traffic off, found again by label after a
//! restart.

use super::*;

/// Whether an error means the Engine could not be reached at all.
/// The network `mode` names, if it names one rather than a mode of its own
/// (the Engine's `bridge`, `host`, `none`, `default`, `container:ID`).
pub fn named_network(mode: &str) -> Option<&str> {
    let builtin = matches!(mode, "" | "bridge" | "host" | "none" | "default")
        || mode.starts_with("container:");
    (!builtin).then_some(mode)
}

/// The Linux bridge of a bridge network: the name it was given, else the
/// Engine's `br-` and the first 12 characters of its id.
pub(super) fn bridge_of(n: &bollard::models::Network) -> Option<String> {
    if n.driver.as_deref() != Some("bridge") {
        return None;
    }
    if let Some(name) = n
        .options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.bridge.name"))
    {
        return Some(name.clone());
    }
    Some(format!("br-{}", n.id.as_deref()?.get(..12)?))
}

pub(super) fn is_ours(n: &bollard::models::Network) -> bool {
    n.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_NETWORK))
}

/// Whether a create or start failed because the network it names is gone,
/// which the Engine says with the same 404 as a missing image.
pub(super) fn network_missing(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, message }
        if message.contains("network"))
}

impl Runtime {
    /// Makes sure the network of `[container] network_mode` exists when it
    /// names one (not `bridge`, `host`, `none`, `container:...`): if missing,
    /// it is created as a bridge with inter-container traffic disabled, so a
    /// call reaches neither another call nor any container on it. Called at
    /// start and again when a create or start finds it gone (`docker network prune`
    /// removes it while no container uses it). With `[container] firewall`,
    /// it then installs the rules for the network's bridge (again, if the
    /// network was made anew), and says first what installing would lack.
    pub async fn ensure_network(&self) -> Result<(), RuntimeError> {
        let Some(name) = named_network(&self.container.network_mode) else {
            return Ok(());
        };
        if let Some(fw) = &self.firewall {
            fw.check().map_err(RuntimeError::Firewall)?;
        }
        let _held = self.network.lock().await;
        let docker = self.docker().await?;
        let mut found = self.networks_named(&docker, name).await?;
        if found.is_empty() {
            let request = NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                options: Some(HashMap::from([(
                    ICC_OPTION.to_string(),
                    "false".to_string(),
                )])),
                labels: Some(HashMap::from([(
                    LABEL_NETWORK.to_string(),
                    "1".to_string(),
                )])),
                ..Default::default()
            };
            if let Err(e) = docker.create_network(request).await {
                return Err(self.classify(e).await);
            }
            tracing::info!(
                network = name,
                "created the call network (bridge, inter-container traffic disabled)"
            );
            found = self.networks_named(&docker, name).await?;
        }
        // Engines before API 1.44 do not refuse a second network of the same
        // name, so two daemons starting together may both have made one; a
        // name that means two networks fails every create. Every daemon keeps
        // the same one (the lowest id) and removes the other ones hyperfuncd
        // made; none has a container yet, since no create could name them.
        found.sort_by(|a, b| a.id.cmp(&b.id));
        for extra in found.iter().skip(1) {
            if let (Some(id), true) = (&extra.id, is_ours(extra)) {
                match docker.remove_network(id).await {
                    Ok(())
                    | Err(DockerError::DockerResponseServerError {
                        status_code: 404, ..
                    }) => {}
                    Err(e) => {
                        tracing::warn!(network = name, id, error = %e, "cannot remove a duplicate call network")
                    }
                }
            }
        }
        if let Some(kept) = found.first() {
            let icc = kept
                .options
                .as_ref()
                .and_then(|o| o.get(ICC_OPTION))
                .map(String::as_str);
            if icc != Some("false") {
                tracing::warn!(
                    network = name,
                    "the call network lets containers reach each other (it was not made by hyperfuncd with {ICC_OPTION}=false)"
                );
            }
            if let Some(fw) = &self.firewall {
                let bridge = bridge_of(kept).ok_or_else(|| {
                    RuntimeError::Firewall(format!("the network {name} is not a Linux bridge"))
                })?;
                fw.apply(&bridge, kept.enable_ipv6.unwrap_or(false))
                    .await
                    .map_err(RuntimeError::Firewall)?;
            }
        }
        Ok(())
    }

    /// The networks called exactly `name` (the Engine's filter matches parts of names).
    pub(super) async fn networks_named(
        &self,
        docker: &Docker,
        name: &str,
    ) -> Result<Vec<bollard::models::Network>, RuntimeError> {
        let filters = HashMap::from([("name".to_string(), vec![name.to_string()])]);
        match docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
        {
            Ok(list) => Ok(list
                .into_iter()
                .filter(|n| n.name.as_deref() == Some(name))
                .collect()),
            Err(e) => Err(self.classify(e).await),
        }
    }
}
