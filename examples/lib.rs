//! kiln's example programs live beside this file; run one with
//! `cargo run --release -p kiln-examples --example train_tiny_gpt`.
