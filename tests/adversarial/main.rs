//! What activescale withstands: every hostile input we know of, each tried
//! against the real server (real sockets, real clients, real Redis and
//! Prometheus where they matter). A newcomer can read the module list as the
//! list of attacks, and each test's name as the promise it checks.
//!
//! - [`prometheus`]: trigger metadata and Prometheus servers (deep PromQL and
//!   formulas, credential and CA files, endless responses).
//! - [`sink`]: what any meshed pod can push (lying values, family floods,
//!   claimed identities, proto3 zeros).
//! - [`flood`]: HTTP/2 floods on the sink (streams per connection, message
//!   bytes held across streams, messages that never finish).
//! - [`transport`]: the open ports themselves (slowloris, client identities
//!   on the scaler port).
//! - [`store`]: a store that refuses writes, namespaces that are not names,
//!   StreamIsActive through an outage.

#[path = "../common/mod.rs"]
mod common;

mod flood;
mod prometheus;
mod sink;
mod store;
mod transport;
