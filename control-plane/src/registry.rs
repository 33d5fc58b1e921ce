//! The node registry: validation of node specs and their storage.
//!
//! Nodes registered here are servers that know nothing of Fulcrum (Triton, MLServer, or a
//! `fulcrum node-sim`): an operator names them with `fulcrum ctl register`, and the control plane
//! probes them. Every check runs before anything is written, so a bad registration changes
//! nothing.

use std::net::SocketAddr;

use fulcrum_proto::fulcrum::v1::NodeSpec;
use prost::Message;

use crate::error::Error;
use crate::keys;
use crate::store::Store;

/// Longest id, region, zone or model name accepted: ids appear in store keys, metrics labels and
/// response metadata, so they stay short.
const MAX_NAME_LEN: usize = 128;

/// Upper bound on a node's capacity (concurrent calls). Far above any real server's, low enough
/// that weight arithmetic never overflows or loses precision.
const MAX_CAPACITY: i64 = 1_000_000;

pub(crate) fn check_name(field: &str, value: &str, required: bool) -> Result<(), Error> {
    if value.is_empty() {
        return if required {
            Err(Error::InvalidSpec(format!("{field} is required")))
        } else {
            Ok(())
        };
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::InvalidSpec(format!(
            "{field} {value:?} is longer than {MAX_NAME_LEN} characters"
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::InvalidSpec(format!(
            "{field} {value:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Checks that `address` is `host:port` with a port in 1..=65535 and a plausible host.
pub fn check_address(address: &str) -> Result<(), Error> {
    let bad =
        |why: &str| Error::InvalidSpec(format!("address {address:?} {why}; expected host:port"));
    if address.parse::<SocketAddr>().is_ok() {
        return if address.ends_with(":0") {
            Err(bad("has port 0"))
        } else {
            Ok(())
        };
    }
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("has an invalid port"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !host_ok {
        return Err(bad("has an invalid host"));
    }
    Ok(())
}

/// Validates a node spec; the error names the first bad field.
pub fn validate(spec: &NodeSpec) -> Result<(), Error> {
    check_name("id", &spec.id, true)?;
    check_address(&spec.address)?;
    check_name("region", &spec.region, true)?;
    check_name("zone", &spec.zone, false)?;
    if spec.capacity <= 0 {
        return Err(Error::InvalidSpec(format!(
            "capacity must be positive, got {}",
            spec.capacity
        )));
    }
    if spec.capacity > MAX_CAPACITY {
        return Err(Error::InvalidSpec(format!(
            "capacity {} is above the maximum {MAX_CAPACITY}",
            spec.capacity
        )));
    }
    // No models: the control plane lists them from the server (`RepositoryIndex`).
    let mut seen = std::collections::HashSet::new();
    for m in &spec.models {
        check_name("model name", &m.name, true)?;
        if !seen.insert(m.name.as_str()) {
            return Err(Error::InvalidSpec(format!(
                "model {:?} is listed twice",
                m.name
            )));
        }
        for v in &m.versions {
            check_name("model version", v, true)?;
        }
    }
    for (k, v) in &spec.labels {
        check_name("label key", k, true)?;
        if v.len() > MAX_NAME_LEN {
            return Err(Error::InvalidSpec(format!("label {k:?} value is too long")));
        }
    }
    Ok(())
}

/// Decodes a stored node spec.
pub fn decode(key: &str, value: &[u8]) -> Result<NodeSpec, Error> {
    NodeSpec::decode(value).map_err(|source| Error::Decode {
        key: key.to_owned(),
        source,
    })
}

/// Registers `spec`. Returns whether it was new, and the store revision.
///
/// The same id with the same address updates the node (idempotent re-registration); the same id
/// with another address is refused, so two servers can never silently share an id.
pub async fn register(store: &dyn Store, spec: &NodeSpec) -> Result<(bool, i64), Error> {
    validate(spec)?;
    let key = keys::node(&spec.id);
    let value = spec.encode_to_vec();
    let existing = store.get(&key).await?;
    let expected = match &existing {
        None => 0,
        Some(kv) => {
            let old = decode(&key, &kv.value)?;
            if old.address != spec.address {
                return Err(Error::AlreadyExists {
                    id: spec.id.clone(),
                    existing: old.address,
                });
            }
            if old == *spec {
                return Ok((false, kv.mod_revision));
            }
            kv.mod_revision
        }
    };
    match store.compare_and_put(&key, expected, value).await? {
        Some(rev) => Ok((existing.is_none(), rev)),
        None => Err(Error::Conflict(key)),
    }
}

/// Removes a node and its overrides. NOT_FOUND when it is not registered.
pub async fn deregister(store: &dyn Store, id: &str) -> Result<i64, Error> {
    check_name("id", id, true).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let rev = store
        .delete(&keys::node(id))
        .await?
        .ok_or_else(|| Error::NodeNotFound(id.to_owned()))?;
    crate::overrides::clear_node(store, id).await?;
    Ok(rev)
}

/// Every registered node, sorted by id.
pub async fn list(store: &dyn Store) -> Result<Vec<NodeSpec>, Error> {
    Ok(list_at(store).await?.0)
}

/// Every registered node, sorted by id, and the store revision they were read at.
pub async fn list_at(store: &dyn Store) -> Result<(Vec<NodeSpec>, i64), Error> {
    let (kvs, revision) = store.list(keys::NODES).await?;
    let specs = kvs
        .iter()
        .map(|kv| decode(&kv.key, &kv.value))
        .collect::<Result<_, _>>()?;
    Ok((specs, revision))
}

/// Every registered node, sorted by id, and whether it registered itself (its record is held
/// by a lease).
pub async fn list_leased(store: &dyn Store) -> Result<Vec<(NodeSpec, bool)>, Error> {
    let (kvs, _) = store.list(keys::NODES).await?;
    kvs.iter()
        .map(|kv| Ok((decode(&kv.key, &kv.value)?, kv.lease != 0)))
        .collect()
}

/// One node's spec.
pub async fn get(store: &dyn Store, id: &str) -> Result<NodeSpec, Error> {
    Ok(get_leased(store, id).await?.0)
}

/// One node's spec, and whether it registered itself (its record is held by a lease).
pub async fn get_leased(store: &dyn Store, id: &str) -> Result<(NodeSpec, bool), Error> {
    let key = keys::node(id);
    let kv = store
        .get(&key)
        .await?
        .ok_or_else(|| Error::NodeNotFound(id.to_owned()))?;
    Ok((decode(&key, &kv.value)?, kv.lease != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use fulcrum_proto::fulcrum::v1::Model;

    fn spec(id: &str, address: &str) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            address: address.into(),
            region: "a".into(),
            zone: String::new(),
            models: vec![Model {
                name: "echo".into(),
                versions: vec![],
            }],
            capacity: 4,
            labels: Default::default(),
        }
    }

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:8001",
            "[::1]:8001",
            "triton-0.models.svc:8001",
            "localhost:1",
        ] {
            check_address(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "127.0.0.1",
            "host:",
            "host:0",
            "host:99999",
            ":80",
            "a b:80",
            "http://x:80",
        ] {
            assert!(check_address(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn specs() {
        validate(&spec("a-1", "127.0.0.1:1")).unwrap();
        let mut s = spec("a-1", "127.0.0.1:1");
        s.capacity = 0;
        assert!(validate(&s).unwrap_err().to_string().contains("capacity"));
        s.capacity = -3;
        assert!(validate(&s).is_err());
        assert!(validate(&spec("", "127.0.0.1:1")).is_err());
        assert!(validate(&spec("a/b", "127.0.0.1:1")).is_err());
        let mut s = spec("x", "127.0.0.1:1");
        s.models.clear();
        validate(&s).expect("no models: discovered from the server");
        s.models = vec![spec("x", "y:1").models[0].clone(); 2];
        assert!(validate(&s).is_err());
    }

    #[tokio::test]
    async fn duplicate_id_with_another_address_changes_nothing() {
        let store = EmbeddedStore::in_memory();
        let (created, _) = register(&store, &spec("n1", "127.0.0.1:1")).await.unwrap();
        assert!(created);
        let (_, before) = store.list(keys::ROOT).await.unwrap();
        let err = register(&store, &spec("n1", "127.0.0.1:2"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        let (_, after) = store.list(keys::ROOT).await.unwrap();
        assert_eq!(before, after, "a refused registration wrote to the store");
        // Same id, same address: idempotent.
        let (created, _) = register(&store, &spec("n1", "127.0.0.1:1")).await.unwrap();
        assert!(!created);
        assert_eq!(get(&store, "n1").await.unwrap().address, "127.0.0.1:1");
    }

    #[tokio::test]
    async fn deregister_unknown_is_not_found() {
        let store = EmbeddedStore::in_memory();
        assert!(matches!(
            deregister(&store, "ghost").await.unwrap_err(),
            Error::NodeNotFound(_)
        ));
    }
}
