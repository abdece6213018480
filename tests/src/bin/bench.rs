//! Benchmarks against a local wrangler dev.
fn main() {}
