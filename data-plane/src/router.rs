//! The router's shared state: its region, the current routing table, and call settings; and
//! the one function that turns a model name into a node.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::balance::locality::{self, Pick};
use crate::error::RouteError;
use crate::table::{NodeConn, RoutedNode, RoutingTable};

/// State shared by the router's services and its subscription.
#[derive(Debug)]
pub struct RouterState {
    /// The region this router serves; its nodes come first.
    pub region: String,
    /// The current table; replaced whole on every update.
    pub table: ArcSwap<RoutingTable>,
    /// Deadline for calls that bring none.
    pub default_timeout: Duration,
    /// Largest message accepted from clients and from nodes.
    pub max_message_size: usize,
}

impl RouterState {
    /// A router state with an empty table.
    pub fn new(region: String, default_timeout: Duration, max_message_size: usize) -> Self {
        Self {
            region,
            table: ArcSwap::from_pointee(RoutingTable::default()),
            default_timeout,
            max_message_size,
        }
    }

    /// Picks a node for `model` in `table`, avoiding the nodes in `tried`: own region first,
    /// power-of-two-choices within the region.
    pub fn pick(
        &self,
        table: &RoutingTable,
        model: &str,
        tried: &[Arc<NodeConn>],
    ) -> Result<RoutedNode, RouteError> {
        let route = table
            .models
            .get(model)
            .ok_or_else(|| RouteError::UnknownModel(model.to_owned()))?;
        let was_tried = |n: &RoutedNode| tried.iter().any(|t| Arc::ptr_eq(t, &n.conn));
        let local: Vec<_> = route
            .local
            .iter()
            .map(|n| n.candidate(was_tried(n)))
            .collect();
        let remote: Vec<_> = route
            .remote
            .iter()
            .map(|n| n.candidate(was_tried(n)))
            .collect();
        let picked = locality::pick(&local, &remote, &mut rand::rng());
        match picked {
            Some(Pick::Local(i)) => Ok(route.local[i].clone()),
            Some(Pick::Remote(i)) => Ok(route.remote[i].clone()),
            None => Err(RouteError::NoHealthyNode {
                model: model.to_owned(),
                region: self.region.clone(),
                version: table.version,
            }),
        }
    }
}
