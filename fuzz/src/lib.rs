//! The drivers the fuzz targets run: the very file the property test in CI runs
//! (`replica/tests/untrusted_input.rs`), so both exercise the same paths and checks.

#[path = "../../replica/tests/untrusted/mod.rs"]
mod untrusted;

pub use untrusted::*;
