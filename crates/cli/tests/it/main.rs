//! The `kiln` binary's tests, in one binary with a module per subject: the
//! commands as a user runs them, multi-node runs on the loopback interface, the
//! web dashboard in a real headless browser, and
//! (in a build with `--features cuda-nccl`) NCCL against burn-collective:
//! `cargo test -p kiln-cli --features cuda-nccl --test it nccl::`.

mod cli;
mod multi_node;
mod nccl;
mod ui;
