//! The shroud-relay data plane (io_uring workers). Filled by the data-plane issue.
//!
//! This crate holds no functionality yet; the issue that fills it builds on
//! `shroud-proto`. Nothing here pretends to work.
