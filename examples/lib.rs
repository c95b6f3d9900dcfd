//! kiln's example programs live beside this file; run one with
//! `cargo run --release -p kiln-examples --example train_cnn`.
//!
//! The library holds the Burn models the examples train, written exactly as a
//! burn-train user writes them (they know nothing of kiln), so that kiln's tests
//! train the same code:
//! - [`image_classifier`]: a CNN on synthetic 4-D images, with dropout,
//!   `ClassificationOutput`, trained with Adam (`examples/train_cnn.rs`);
//! - [`regressor`]: a regression model with its own loss (Huber's) and dropout,
//!   `RegressionOutput`, trained with SGD and momentum
//!   (`examples/train_regressor.rs`).

pub mod image_classifier;
pub mod regressor;
