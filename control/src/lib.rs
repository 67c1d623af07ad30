//! shroudctl, the control plane. Filled by the control-plane issue.
//!
//! This crate holds no functionality yet; the issue that fills it builds on
//! `shroud-proto`. Nothing here pretends to work.
