//! The CLI's integration tests, in one binary so that they link once (as ripgrep does).
//! Run one module with `cargo test -p potluck --test it privacy::`.

mod cli;
mod common;
mod insecure;
mod lists;
mod privacy;
mod provide_cli;
