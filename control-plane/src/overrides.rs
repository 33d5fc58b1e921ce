//! Operator overrides: what an operator says about nodes and regions, over what the probes say.
//!
//! - drain (`/fulcrum/v1/overrides/drain/<id>`): weight zero, calls in flight finish;
//! - cordon (`/fulcrum/v1/overrides/cordon/<id>`): no new calls (state CORDONED, weight zero);
//! - weight (`/fulcrum/v1/overrides/weight/<id>`): a fixed weight instead of the computed one,
//!   for a node that is routable at all;
//! - region (`/fulcrum/v1/overrides/region/<region>`): the region is evacuated, every node in it
//!   gets weight zero and routers send its calls to the other region (a manual failover).
//!
//! The leader follows them with a watch ([`Overrides::apply`]). A node's overrides go with the
//! node: `ctl deregister` clears them, and the leader removes those of nodes that left the
//! registry any other way (a self-registered node whose lease expired or was revoked).

use std::collections::{HashMap, HashSet};

use crate::error::Error;
use crate::keys;
use crate::registry;
use crate::store::Store;

/// Largest weight an operator may set: the largest capacity a node may be registered with, so
/// an override never dwarfs every computed weight by more than any real node could.
pub const MAX_WEIGHT: f64 = 1_000_000.0;

const DRAIN: &str = "drain/";
const CORDON: &str = "cordon/";
const WEIGHT: &str = "weight/";
const REGION: &str = "region/";

/// Every override in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Drained node ids.
    pub drained: HashSet<String>,
    /// Cordoned node ids.
    pub cordoned: HashSet<String>,
    /// Weight overrides by node id.
    pub weights: HashMap<String, f64>,
    /// Evacuated regions.
    pub evacuated: HashSet<String>,
}

/// What an override key is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A node (drain, cordon, weight).
    Node(String),
    /// A region (evacuation).
    Region(String),
}

impl Overrides {
    /// Applies the write (`Some(value)`) or delete (`None`) of the override at `key`; what it
    /// is about, when the key is an override's.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Option<Subject> {
        let rest = key.strip_prefix(keys::OVERRIDES)?;
        if let Some(id) = rest.strip_prefix(DRAIN) {
            toggle_in(&mut self.drained, id, value.is_some());
        } else if let Some(id) = rest.strip_prefix(CORDON) {
            toggle_in(&mut self.cordoned, id, value.is_some());
        } else if let Some(id) = rest.strip_prefix(WEIGHT) {
            let w = value.and_then(|v| {
                let w = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|w| w.is_finite() && (0.0..=MAX_WEIGHT).contains(w));
                if w.is_none() {
                    tracing::error!(key = %key, "ignoring an unreadable weight override");
                }
                w
            });
            match w {
                Some(w) => self.weights.insert(id.to_owned(), w),
                None => self.weights.remove(id),
            };
        } else if let Some(region) = rest.strip_prefix(REGION) {
            toggle_in(&mut self.evacuated, region, value.is_some());
            return Some(Subject::Region(region.to_owned()));
        } else {
            return None;
        }
        let id = [DRAIN, CORDON, WEIGHT]
            .iter()
            .find_map(|kind| rest.strip_prefix(kind))?;
        Some(Subject::Node(id.to_owned()))
    }
}

fn toggle_in(set: &mut HashSet<String>, name: &str, on: bool) {
    if on {
        set.insert(name.to_owned());
    } else {
        set.remove(name);
    }
}

/// The node a drain, cordon or weight override key is about.
pub fn node_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(keys::OVERRIDES)?;
    [DRAIN, CORDON, WEIGHT]
        .iter()
        .find_map(|kind| rest.strip_prefix(kind))
}

/// Reads every override.
pub async fn load(store: &dyn Store) -> Result<Overrides, Error> {
    let (kvs, _) = store.list(keys::OVERRIDES).await?;
    let mut o = Overrides::default();
    for kv in kvs {
        o.apply(&kv.key, Some(&kv.value));
    }
    Ok(o)
}

fn key(kind: &str, name: &str) -> String {
    format!("{}{kind}{name}", keys::OVERRIDES)
}

async fn toggle(store: &dyn Store, kind: &str, id: &str, on: bool) -> Result<(), Error> {
    registry::get(store, id).await?;
    if on {
        store.put(&key(kind, id), b"1".to_vec()).await?;
    } else {
        store.delete(&key(kind, id)).await?;
    }
    Ok(())
}

/// Sets or clears a node's drain. NOT_FOUND for an unknown node.
pub async fn set_drain(store: &dyn Store, id: &str, drain: bool) -> Result<(), Error> {
    toggle(store, DRAIN, id, drain).await
}

/// Sets or clears a node's cordon. NOT_FOUND for an unknown node.
pub async fn set_cordon(store: &dyn Store, id: &str, cordon: bool) -> Result<(), Error> {
    toggle(store, CORDON, id, cordon).await
}

/// Sets (`Some`) or clears (`None`) a node's weight override; refuses weights outside
/// `[0, MAX_WEIGHT]` before writing anything.
pub async fn set_weight(store: &dyn Store, id: &str, weight: Option<f64>) -> Result<(), Error> {
    if let Some(w) = weight
        && !(w.is_finite() && (0.0..=MAX_WEIGHT).contains(&w))
    {
        return Err(Error::InvalidArgument(format!(
            "weight {w} is outside [0, {MAX_WEIGHT}]"
        )));
    }
    registry::get(store, id).await?;
    match weight {
        Some(w) => {
            store
                .put(&key(WEIGHT, id), w.to_string().into_bytes())
                .await?
        }
        None => store.delete(&key(WEIGHT, id)).await?.unwrap_or_default(),
    };
    Ok(())
}

/// Evacuates (or restores) a region. The region must have at least one registered node, so a
/// typo cannot silently evacuate nothing.
pub async fn set_region(store: &dyn Store, region: &str, evacuated: bool) -> Result<(), Error> {
    if region.is_empty() {
        return Err(Error::InvalidArgument("region is required".into()));
    }
    let known = registry::list(store)
        .await?
        .iter()
        .any(|s| s.region == region);
    if !known {
        return Err(Error::RegionNotFound(region.to_owned()));
    }
    if evacuated {
        store.put(&key(REGION, region), b"1".to_vec()).await?;
    } else {
        store.delete(&key(REGION, region)).await?;
    }
    Ok(())
}

/// Removes every override of a node (it is being deregistered).
pub async fn clear_node(store: &dyn Store, id: &str) -> Result<(), Error> {
    for kind in [DRAIN, CORDON, WEIGHT] {
        store.delete(&key(kind, id)).await?;
    }
    Ok(())
}

/// Removes the drain, cordon and weight overrides of nodes not in `registered`, the registry as
/// read at revision `read_at`. An override written after that read is left alone (its node may
/// have registered since), and each delete is conditional on the override not having been
/// rewritten since it was listed, so an operator racing this never loses an override of a live
/// node. Returns how many were removed.
pub async fn remove_orphans(
    store: &dyn Store,
    registered: &HashSet<&str>,
    read_at: i64,
) -> Result<usize, Error> {
    let (kvs, _) = store.list(keys::OVERRIDES).await?;
    let found = kvs.iter().map(|kv| (kv.key.as_str(), kv.mod_revision));
    remove_orphans_of(store, found, |id| registered.contains(id), read_at).await
}

/// [`remove_orphans`] over overrides already listed: `(key, mod_revision)` pairs.
pub async fn remove_orphans_of<'a>(
    store: &dyn Store,
    overrides: impl IntoIterator<Item = (&'a str, i64)>,
    registered: impl Fn(&str) -> bool,
    read_at: i64,
) -> Result<usize, Error> {
    let orphans: Vec<(&str, i64)> = overrides
        .into_iter()
        .filter(|(key, rev)| node_of(key).is_some_and(|id| !registered(id)) && *rev <= read_at)
        .collect();
    let mut removed = 0;
    for (key, rev) in orphans {
        if store.compare_and_delete(key, rev).await?.is_some() {
            tracing::info!(key = %key, "removed the override of a node that left");
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use fulcrum_proto::fulcrum::v1::{Model, NodeSpec};

    async fn store_with_node() -> EmbeddedStore {
        let s = EmbeddedStore::in_memory();
        let spec = NodeSpec {
            id: "n".into(),
            address: "127.0.0.1:1".into(),
            region: "a".into(),
            models: vec![Model {
                name: "m".into(),
                versions: vec![],
            }],
            capacity: 2,
            ..Default::default()
        };
        registry::register(&s, &spec).await.unwrap();
        s
    }

    #[tokio::test]
    async fn overrides_round_trip() {
        let s = store_with_node().await;
        set_drain(&s, "n", true).await.unwrap();
        set_cordon(&s, "n", true).await.unwrap();
        set_weight(&s, "n", Some(3.5)).await.unwrap();
        set_region(&s, "a", true).await.unwrap();
        let o = load(&s).await.unwrap();
        assert!(o.drained.contains("n") && o.cordoned.contains("n") && o.evacuated.contains("a"));
        assert_eq!(o.weights["n"], 3.5);
        clear_node(&s, "n").await.unwrap();
        set_region(&s, "a", false).await.unwrap();
        assert_eq!(load(&s).await.unwrap(), Overrides::default());
    }

    #[test]
    fn applying_writes_and_deletes_says_what_they_concern() {
        let mut o = Overrides::default();
        let k = |kind: &str, name: &str| key(kind, name);
        assert_eq!(
            o.apply(&k(WEIGHT, "n"), Some(b"2.5")),
            Some(Subject::Node("n".into()))
        );
        assert_eq!(o.weights["n"], 2.5);
        assert_eq!(
            o.apply(&k(WEIGHT, "n"), Some(b"lots")),
            Some(Subject::Node("n".into()))
        );
        assert!(o.weights.is_empty(), "an unreadable weight counts as none");
        o.apply(&k(DRAIN, "n"), Some(b"1"));
        assert!(o.drained.contains("n"));
        o.apply(&k(DRAIN, "n"), None);
        assert!(o.drained.is_empty());
        assert_eq!(
            o.apply(&k(REGION, "b"), Some(b"1")),
            Some(Subject::Region("b".into()))
        );
        assert!(o.evacuated.contains("b"));
        assert_eq!(o.apply(&k("other/", "x"), Some(b"1")), None);
        assert_eq!(o.apply("/elsewhere/x", Some(b"1")), None);
        assert_eq!(node_of(&k(CORDON, "m")), Some("m"));
        assert_eq!(node_of(&k(REGION, "b")), None);
    }

    #[tokio::test]
    async fn bad_overrides_change_nothing() {
        let s = store_with_node().await;
        let (before, _) = s.list(keys::ROOT).await.unwrap();
        for w in [-1.0, f64::NAN, f64::INFINITY, MAX_WEIGHT * 2.0] {
            assert!(matches!(
                set_weight(&s, "n", Some(w)).await,
                Err(Error::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            set_weight(&s, "ghost", Some(1.0)).await,
            Err(Error::NodeNotFound(_))
        ));
        assert!(matches!(
            set_cordon(&s, "ghost", true).await,
            Err(Error::NodeNotFound(_))
        ));
        assert!(matches!(
            set_region(&s, "nowhere", true).await,
            Err(Error::RegionNotFound(_))
        ));
        let (after, _) = s.list(keys::ROOT).await.unwrap();
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn overrides_of_nodes_that_left_are_removed() {
        let s = store_with_node().await;
        set_drain(&s, "n", true).await.unwrap();
        set_weight(&s, "n", Some(2.0)).await.unwrap();
        set_region(&s, "a", true).await.unwrap();
        // The node leaves without `deregister` (as a lease expiring deletes its key).
        s.delete(&keys::node("n")).await.unwrap();
        let (specs, read_at) = registry::list_at(&s).await.unwrap();
        assert!(specs.is_empty());
        // An override written after the registry was read is kept: its node may be new.
        s.put(&key(CORDON, "n"), b"1".to_vec()).await.unwrap();
        assert_eq!(
            remove_orphans(&s, &HashSet::new(), read_at).await.unwrap(),
            2
        );
        let o = load(&s).await.unwrap();
        assert!(o.drained.is_empty() && o.weights.is_empty());
        assert!(o.cordoned.contains("n"), "a newer override was removed");
        assert!(
            o.evacuated.contains("a"),
            "a region's state is not a node's"
        );
        // With the node registered, nothing is removed.
        let (_, read_at) = registry::list_at(&s).await.unwrap();
        let live = HashSet::from(["n"]);
        assert_eq!(remove_orphans(&s, &live, read_at).await.unwrap(), 0);
    }
}
