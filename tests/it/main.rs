//! kiln's cross-crate tests, in one binary: the coordinator, the models and the
//! data working together. One module per subject; `cargo test -p kiln-tests
//! general::` runs one of them.
//!
//! Tests that need Burn's process-wide RNG to themselves (bit-for-bit dropout)
//! run in a process of their own: [`kiln_tests::own_process`].

mod checkpoint;
mod ddp;
mod engines;
mod general;
mod precision;
mod run_outcomes;
mod train_lm;
