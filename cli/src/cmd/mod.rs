//! One module per subcommand.

pub(crate) mod control;
pub(crate) mod ctl;
pub(crate) mod load;
pub(crate) mod node_sim;
pub(crate) mod router;
pub(crate) mod up;
