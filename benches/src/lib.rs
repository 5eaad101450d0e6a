//! Criterion benchmarks of CyberBackup's hot paths; see benches/hot_paths.rs.
