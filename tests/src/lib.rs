//! Integration tests that run the real binaries as processes.
//!
//! This crate holds no functionality yet; the issue that fills it builds on
//! `shroud-proto`. Nothing here pretends to work.
