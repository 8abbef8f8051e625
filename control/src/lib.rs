//! warren-control: the coordination server. Nodes register with pre-auth keys, get stable
//! addresses and follow a stream of netmaps; operators manage users, keys and nodes through
//! the admin API and CLI.

pub mod cli;
pub mod config;
pub mod core;
pub mod derpmap;
pub mod error;
pub mod grpc;
pub mod ipam;
pub mod listen;
pub mod metrics;
pub mod netmap;
pub mod outbox;
pub mod policy;
pub mod reload;
pub mod routes;
pub mod secret;
pub mod serve;
pub mod store;
pub mod web;
