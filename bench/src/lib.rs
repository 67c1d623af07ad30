//! shroud-bench: criterion micro-benchmarks live in `benches/`; the network
//! benchmark binary arrives with the benchmark issue.
