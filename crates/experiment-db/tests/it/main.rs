//! kiln-experiment-db's integration tests, in one binary with a module per
//! subject: real database files in temporary directories, several processes on
//! one store, the queries and the schema.

mod common;
mod lifecycle;
mod processes;
mod queries;
mod store;
